"""``m4r serve REPO``: the tritonserver bundled in nvidia-pytriton on 127.0.0.1, in the foreground.

Checks the environment first (each problem is one line with its fix), starts
:class:`~m4r_export.serve.local.LocalTritonServer` on the repository's absolute path, prints the
URLs and a curl example built from the served model's own config, and on Ctrl-C or SIGTERM stops
the server and every process it started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import M4RError, UsageError

PYTRITON_FIX = 'pip install --no-deps "nvidia-pytriton==0.7.0"'


def environment_problem() -> str | None:
    """Why the bundled server cannot serve here (with the one-line fix), or None."""
    from . import local

    if importlib.util.find_spec("pytriton") is None:
        return f"nvidia-pytriton (which bundles tritonserver) is not installed; run: {PYTRITON_FIX}"
    reason = local.unavailable_reason()
    if reason is not None:
        if "numpy" in reason:
            return f'{reason.split(";")[0]}; run: pip install "numpy<2"'
        return f"{reason}; run: {PYTRITON_FIX}"
    if importlib.util.find_spec("tritonclient") is None:
        return (
            "tritonclient is not installed (the repository's configs and the clients need it); run: "
            'pip install "tritonclient[grpc,http]" (or pip install "m4r-export[triton]")'
        )
    return None


def check_repository(repo: Path) -> list[str]:
    """The model names in ``repo`` (folders with a config.pbtxt), or a UsageError naming the fix."""
    if not repo.is_dir():
        raise UsageError(
            f"model repository {repo} does not exist; write one with "
            f"`m4r triton --artifacts DIR --repo {repo}`"
        )
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not models:
        raise UsageError(
            f"{repo} holds no model (no */config.pbtxt); pass the folder written by `m4r triton --repo`"
        )
    return models


def curl_example(http: str, model: str, config: dict[str, Any]) -> str:
    """A curl command that sends one request to ``model``, from its config (as Triton reports it)."""
    batched = int(config.get("max_batch_size", 0)) > 0
    inputs = []
    for inp in config.get("input", []):
        data: list[Any]
        dims = [int(d) if int(d) > 0 else 1 for d in inp.get("dims", [])]
        shape = ([1] if batched else []) + dims
        size = 1
        for d in shape:
            size *= d
        name, dtype = inp["name"], str(inp.get("data_type", "TYPE_INT64")).removeprefix("TYPE_")
        if dtype == "STRING":
            dtype, data = "BYTES", ["1"] * size
        elif name == "item_seq_len":
            data = [3] * size  # the three items below
        elif name in ("item_seq", "item_id"):
            width = dims[-1] if dims else 1
            data = [k % width + 1 if k % width < 3 else 0 for k in range(size)]  # items 1, 2, 3; 0-padded
        else:
            data = [0] * size
        inputs.append({"name": name, "shape": shape, "datatype": dtype, "data": data})
    body = json.dumps({"inputs": inputs}, separators=(",", ":"))
    return f"curl -s -X POST {http}/v2/models/{model}/infer -H 'Content-Type: application/json' -d '{body}'"


def _model_config(http: str, model: str) -> dict[str, Any]:
    url = f"{http}/v2/models/{model}/config"
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=5) as resp:
        config = json.loads(resp.read())
        if isinstance(config, dict):
            return config
    return {}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    repo: Path,
    *,
    ports: tuple[int, int, int] = (8000, 8001, 8002),
    startup_timeout_s: float = 120.0,
    echo: Callable[[str], None] = click.echo,
) -> int:
    """Serve ``repo`` until Ctrl-C/SIGTERM; returns the server's exit code (0 on a clean stop)."""
    from .local import LocalTritonServer

    repo = repo.expanduser().resolve()
    models = check_repository(repo)
    problem = environment_problem()
    if problem is not None:
        raise M4RError(f"cannot start the bundled tritonserver: {problem}")
    server = LocalTritonServer(repo, startup_timeout_s=startup_timeout_s, ports=ports)
    echo(f"starting tritonserver on {repo} ({len(models)} model(s): {', '.join(models)}) ...")
    with _sigterm_as_interrupt():
        try:
            server.start()
            http = f"http://{server.http_url}"
            model = models[0]
            echo(
                f"ready: HTTP {http}  gRPC {server.grpc_url}  metrics http://127.0.0.1:{server.metrics_port}/metrics"
            )
            echo(f"models: {', '.join(f'{http}/v2/models/{m}' for m in models)}")
            echo(f"try: {curl_example(http, model, _model_config(http, model))}")
            echo(f"server log: {server.log_path}; Ctrl-C to stop")
            assert server.proc is not None
            while server.proc.poll() is None:
                time.sleep(0.5)
            log = server.log()
            raise M4RError(
                f"tritonserver exited by itself (code {server.proc.returncode}); its log ends:\n{log[-2000:]}"
            )
        except KeyboardInterrupt:
            echo("stopping tritonserver ...")
            code = server.stop()
            echo(f"stopped (exit code {code})")
            return 0 if code in (0, None) else int(code)
        finally:
            server.stop()
            server.cleanup()


@click.command("serve")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option(
    "--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port."
)
@click.option(
    "--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: any free port."
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0: any free port."
)
@click.option(
    "--startup-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Seconds."
)
def serve_cmd(repo: Path, http_port: int, grpc_port: int, metrics_port: int, startup_timeout: float) -> None:
    """Serve a model repository (from `m4r triton`) with the tritonserver bundled in nvidia-pytriton.

    Binds 127.0.0.1 only (CPU, Python backend); prints the URLs and a curl example; Ctrl-C or SIGTERM
    stops the server cleanly. For GPUs and production, run the NGC container (the repository's README).
    """
    code = serve(repo, ports=(http_port, grpc_port, metrics_port), startup_timeout_s=startup_timeout)
    if code:
        raise M4RError(f"tritonserver stopped with exit code {code}", exit_code=1)
