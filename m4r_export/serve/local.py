"""Run the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel on loopback (tests, CPU hosts).

The wheel ships a real Triton server with the Python backend, and one Python-backend stub per
Python version. :class:`LocalTritonServer` lays out a backend directory of its own (the backend
plus the stub for the running interpreter), binds HTTP/gRPC/metrics to 127.0.0.1 on free ports,
waits until the server is ready, and on exit stops the server and every process it started (it
runs in its own process group). :func:`unavailable_reason` says why it cannot run here.

The stub embeds the system's ``libpython`` and ignores ``PYTHONPATH``: it computes its prefix from
the first ``python3`` on ``PATH`` and imports ``site`` (Debian's patched copy, frozen into that
``libpython``, which adds ``lib/python3.X/site-packages`` only inside a virtual environment). So a
non-venv interpreter (pyenv, a distribution's Python) gave the stub no site-packages at all. The
launcher therefore hands the stub a throw-away virtual environment of its own (:func:`_stub_python`)
whose one ``.pth`` file rebuilds this interpreter's ``sys.path``, site directories included: the
stub sees exactly the packages this Python sees, venv or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from ..errors import M4RError


def _dist() -> tuple[Path, Path, Path]:
    """(tritonserver dir, bundled shared libraries, stub for this Python) from the pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise M4RError("nvidia-pytriton is not installed (pip install nvidia-pytriton)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    server = pkg / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = pkg.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise M4RError(f"{server}/bin/tritonserver missing from the nvidia-pytriton wheel")
    if not stub.is_file():
        raise M4RError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version}")
    return server, libs, stub


def unavailable_reason() -> str | None:
    """None when the bundled server can be started here, else why not."""
    if not sys.platform.startswith("linux"):
        return f"the bundled tritonserver is a Linux binary (this is {sys.platform})"
    try:
        _dist()
    except M4RError as exc:
        return str(exc)
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        return (
            f"the Python-backend stub bundled in nvidia-pytriton 0.7.0 embeds this Python and returns empty "
            f"tensors with numpy {numpy.__version__}; install numpy<2 to run the bundled server"
        )
    return None


def _stub_python(root: Path) -> Path:
    """A minimal virtual environment at ``root`` for the stub; returns its ``bin`` directory.

    ``bin/python3`` links to this interpreter (the stub only locates ``pyvenv.cfg`` through it),
    ``home`` is the base interpreter's directory (the standard library is found from there), and
    ``m4r_parent_path.pth`` puts this process's ``sys.path`` first and processes the ``.pth`` files
    of its site directories (editable installs, path hooks).
    """
    import site

    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    for name in ("python3", f"python{version}", "python"):
        os.symlink(sys.executable, bindir / name)
    home = Path(sys.base_prefix) / "bin"
    cfg = f"home = {home}\ninclude-system-site-packages = false\nversion = {version}\n"
    (root / "pyvenv.cfg").write_text(cfg)
    site_packages = root / "lib" / f"python{version}" / "site-packages"
    site_packages.mkdir(parents=True)
    paths = [p for p in sys.path if p]
    site_dirs = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if p in paths]
    line = (
        f"import site, sys; sys.path[:0] = [p for p in {paths!r} if p not in sys.path]; "
        f"[site.addsitedir(p) for p in {site_dirs!r}]\n"
    )
    (site_packages / "m4r_parent_path.pth").write_text(line)
    return bindir


def first_error(log: str) -> str:
    """The first error line of a tritonserver log (glog ``E...``, ``error:``), CUDA-absence noise skipped."""
    noise = ("CudaDriverHelper", "CUDA driver", "cuda driver", "pinned memory")
    for raw in log.splitlines():
        line = raw.strip()
        is_error = (len(line) > 1 and line[0] == "E" and line[1].isdigit()) or line.startswith("error:")
        if is_error and not any(n in line for n in noise):
            return line[:1000]
    return "(no error line in the server log)"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1: every socket stays bound until all are picked (a
    port released before the next pick can be handed out again, and tritonserver refuses to start
    when two of its listeners get the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


class LocalTritonServer:
    """``with LocalTritonServer(repo) as server: server.http_url, server.grpc_url``."""

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        startup_timeout_s: float = 120.0,
        ports: tuple[int, int, int] | None = None,
    ) -> None:
        # absolute: the server runs in a work directory of its own, where a relative path means nothing
        self.repository = Path(repository).expanduser().resolve()
        self.startup_timeout_s = startup_timeout_s
        #: (http, grpc, metrics); None or 0 = a free port
        self.ports = ports or (0, 0, 0)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "tritonserver.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self._workdir else ""

    def start(self) -> LocalTritonServer:
        reason = unavailable_reason()
        if reason:
            raise M4RError(f"cannot start the bundled tritonserver: {reason}")
        server, libs, stub = _dist()
        self._workdir = Path(tempfile.mkdtemp(prefix="m4r-triton-"))
        backends = self._workdir / "backends"
        shutil.copytree(server / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        free = iter(_free_ports(sum(1 for p in self.ports if not p)))
        self.http_port, self.grpc_port, self.metrics_port = (p or next(free) for p in self.ports)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        # the stub embeds the system libpython and finds its prefix through PATH (module docstring)
        env["PATH"] = os.pathsep.join((str(_stub_python(self._workdir / "python")), env.get("PATH", "")))
        env.pop("PYTHONHOME", None)
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={server / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 (owned by the process for its lifetime)
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self._workdir
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                self.stop()
                self.cleanup()
                raise M4RError(
                    f"tritonserver exited with code {self.proc.returncode}: {first_error(log)}\n"
                    f"log tail:\n{log[-3000:]}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, OSError),
                urllib.request.urlopen(url, timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        log = self.log()
        self.stop()
        self.cleanup()
        raise M4RError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s: {first_error(log)}\n"
            f"log tail:\n{log[-3000:]}"
        )

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads models and exits), then SIGKILL the whole group if needed."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.proc.wait()
        # stubs are in the same process group: make sure none outlives the server
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        return self.proc.returncode

    def cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.cleanup()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
