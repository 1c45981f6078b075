"""Hostile and careless checkpoints (issue 8 items 1-4, issue 13 item 4).

Each payload is built by hand from pickle opcodes, so the tests do not depend on how a Python
object happens to pickle. A payload that ran would leave a marker file: none may exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from m4r_export.checkpoint import UnsafeCheckpointError, read_checkpoint, save_checkpoint
from m4r_export.cli import main
from m4r_export.errors import M4RError, UsageError
from m4r_export.model import Mamba4Rec


def tiny_model() -> Mamba4Rec:
    torch.manual_seed(0)
    return Mamba4Rec(30, hidden_size=16, d_state=8)


def zip_checkpoint(path: Path, data_pkl: bytes) -> Path:
    """A torch zip checkpoint whose pickle is ``data_pkl`` (torch.load reads it like torch.save's)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    return path


def legacy_checkpoint(path: Path, main_pickle: bytes) -> Path:
    """PyTorch's legacy (non-zip) layout: magic, protocol, sys info, the pickle, storage keys."""
    buf = io.BytesIO()
    for header in (
        0x1950A86A20F9469CFC6C,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
    ):
        pickle.dump(header, buf, protocol=2)
    buf.write(main_pickle)
    pickle.dump([], buf, protocol=2)
    path.write_bytes(buf.getvalue())
    return path


def _u(text: str) -> bytes:
    """SHORT_BINUNICODE opcode for ``text``."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


# BUILD with (None, {"dump_patches": True, "__name__": ...}) on the torch.TypedStorage class, then a
# "module" persistent id: torch's legacy loader then writes "<__name__>.patch" into the cwd.
TYPED_STORAGE_BUILD = (
    b"\x80\x02ctorch\nTypedStorage\n"
    + b"N}"
    + _u("dump_patches")
    + b"\x88"
    + b"s"
    + _u("__name__")
    + _u("m4r-chosen-name")
    + b"s\x86b0"  # TUPLE2, BUILD, POP
    + b"("
    + _u("module")
    + b"ctorch\nTypedStorage\n"
    + _u("evil.py")
    + _u("class Evil: pass\n")
    + b"tQ."  # TUPLE, BINPERSID, STOP
)


@pytest.fixture
def restore_typed_storage() -> Iterator[None]:
    """Undo what the payload does on a vulnerable loader, so one failure does not leak into others."""
    name = torch.TypedStorage.__name__
    yield
    torch.TypedStorage.__name__ = name
    if "dump_patches" in vars(torch.TypedStorage):
        delattr(torch.TypedStorage, "dump_patches")


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_typed_storage_attribute_payload_mutates_nothing(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_typed_storage: None
) -> None:
    """Issue 8 item 1: no allowlisted class gets attributes set, no .patch file is written."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    if layout == "legacy":
        legacy_checkpoint(path, TYPED_STORAGE_BUILD)
    else:
        zip_checkpoint(path, TYPED_STORAGE_BUILD)
    with pytest.raises(M4RError):
        read_checkpoint(path)
    assert "dump_patches" not in vars(torch.TypedStorage)
    assert torch.TypedStorage.__name__ == "TypedStorage"
    assert not list(tmp_path.glob("*.patch"))


def test_build_on_a_captured_record_is_still_allowed(tmp_path: Path) -> None:
    """The BUILD refusal must not break RecBole's own pickles (Config objects carry their state)."""
    from test_checkpoint import write_fake_recbole_checkpoint

    model = tiny_model()
    path = tmp_path / "rb.pth"
    write_fake_recbole_checkpoint(path, model.state_dict(), hidden_size=16, d_state=8, dropout_prob=0.1)
    ck = read_checkpoint(path)
    assert ck.config.dropout_prob == 0.1
    out = ck.build_model()(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    assert torch.equal(out, model.eval()(torch.tensor([[1, 2, 3]]), torch.tensor([3])))


# ---------------------------------------------------------------------- code-execution payloads


def _payloads(marker: Path) -> dict[str, bytes]:
    m = str(marker)
    touch = f"open({m!r}, 'w').close()"
    inner = b"\x80\x02cos\nsystem\n" + _u(f"touch {m}") + b"\x85R."
    return {
        "builtins.eval": b"\x80\x02cbuiltins\neval\n" + _u(touch) + b"\x85R.",
        "builtins.exec": b"\x80\x02cbuiltins\nexec\n" + _u(touch) + b"\x85R.",
        # getattr(__import__("os"), "system")("touch marker")
        "builtins.getattr": b"\x80\x02cbuiltins\ngetattr\n"
        + b"cbuiltins\n__import__\n"
        + _u("os")
        + b"\x85R"
        + _u("system")
        + b"\x86R"
        + _u(f"touch {m}")
        + b"\x85R.",
        # __import__("os") first, memoised, then getattr(..., "system")(...)
        "builtins.__import__": b"\x80\x02cbuiltins\n__import__\n"
        + _u("os")
        + b"\x85R\x94"  # MEMOIZE
        + b"0cbuiltins\ngetattr\nh\x00"
        + _u("system")
        + b"\x86R"
        + _u(f"touch {m}")
        + b"\x85R.",
        "subprocess.call": b"\x80\x02csubprocess\ncall\n" + b"]" + _u("touch") + _u(m) + b"e\x85R.",
        "subprocess.Popen": b"\x80\x02csubprocess\nPopen\n" + b"]" + _u("touch") + _u(m) + b"e\x85R.",
        "os.system": inner,
        "posix.system": b"\x80\x02cposix\nsystem\n" + _u(f"touch {m}") + b"\x85R.",
        "importlib.import_module": b"\x80\x02cimportlib\nimport_module\n"
        + _u("os")
        + b"\x85R\x94"
        + b"0cbuiltins\ngetattr\nh\x00"
        + _u("system")
        + b"\x86R"
        + _u(f"touch {m}")
        + b"\x85R.",
        "pickle.loads": b"\x80\x03cpickle\nloads\nC" + bytes([len(inner)]) + inner + b"\x85R.",
        "_pickle.loads": b"\x80\x03c_pickle\nloads\nC" + bytes([len(inner)]) + inner + b"\x85R.",
        # torch.save({}, marker) writes the marker; torch.from_file(marker, True, 8) creates it
        "torch.save": b"\x80\x02ctorch\nsave\n}" + _u(m) + b"\x86R.",
        "torch.serialization.save": b"\x80\x02ctorch.serialization\nsave\n}" + _u(m) + b"\x86R.",
        "torch.from_file": b"\x80\x02ctorch\nfrom_file\n" + _u(m) + b"\x88K\x08\x87R.",
        "torch.load": b"\x80\x02ctorch\nload\n" + _u(m) + b"\x85R.",
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("family", sorted(_payloads(Path("/x"))))
def test_code_execution_payload_is_refused(family: str, tmp_path: Path) -> None:
    """Issue 13 item 4: one payload per dangerous family; each is refused by name, none runs."""
    marker = tmp_path / f"pwned-{family}"
    path = zip_checkpoint(tmp_path / "evil.pt", _payloads(marker)[family])
    with pytest.raises(UnsafeCheckpointError, match=family.rsplit(".", 1)[-1]):
        read_checkpoint(path)
    assert not marker.exists()


def test_payloads_would_run_without_the_allowlist(tmp_path: Path) -> None:
    """The payloads are real: an unrestricted unpickler runs them (so the test above can fail)."""
    for family in ("builtins.eval", "builtins.getattr", "importlib.import_module", "torch.save"):
        marker = tmp_path / f"ran-{family}"
        pickle.loads(_payloads(marker)[family])  # noqa: S301 (the point of this test)
        assert marker.exists(), family


def test_calling_a_storage_class_is_refused(tmp_path: Path) -> None:
    """Storage classes may be named in a tensor's persistent id, never called (allocation bomb)."""
    payload = b"\x80\x02ctorch\nFloatStorage\nK\x0a\x85R."
    with pytest.raises(UnsafeCheckpointError, match="FloatStorage"):
        read_checkpoint(zip_checkpoint(tmp_path / "alloc.pt", payload))


# ------------------------------------------------------------------------------- memory bombs

# Peak RSS of the child's own address space: VmHWM. (getrusage's ru_maxrss would also count the
# parent's RSS, which a vfork+exec child inherits as its starting high-water mark.)
_CHILD = """
import sys
from m4r_export.checkpoint import read_checkpoint
from m4r_export.errors import M4RError
try:
    read_checkpoint(sys.argv[1]).build_model()
    print("LOADED")
except M4RError as exc:
    print("ERROR", exc)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_MB", int(hwm.split()[1]) / 1024)
"""


def _own_checkpoint_with_config(path: Path, **config: object) -> Path:
    model = tiny_model()
    save_checkpoint(path, model, None, {"max_seq_len": 20})
    raw = torch.load(path, weights_only=True)
    raw["config"].update(config)
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    "config",
    [{"n_items": 20_000_000}, {"hidden_size": 4096, "num_layers": 64}],
    ids=["n_items-20M", "hidden4096-64layers"],
)
def test_config_memory_bomb_stays_small(config: dict[str, int], tmp_path: Path) -> None:
    """Issue 8 item 2: a small file whose config asks for GBs is refused before allocating (peak RSS)."""
    path = _own_checkpoint_with_config(tmp_path / "bomb.pt", **config)
    assert path.stat().st_size < 400_000
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout
    assert "ERROR" in out and "come from different models" in out, out + proc.stderr
    peak = float(out.split("PEAK_MB")[1])
    assert peak < 300, f"peak RSS {peak:.0f} MB"


def test_recbole_num_layers_bomb_is_refused_at_once(tmp_path: Path) -> None:
    from test_checkpoint import write_fake_recbole_checkpoint

    path = tmp_path / "rb.pth"
    sd = tiny_model().state_dict()
    write_fake_recbole_checkpoint(path, sd, hidden_size=16, d_state=8, num_layers=100000)
    with pytest.raises(
        UsageError, match=r"num_layers = 100000 is out of range; allowed: an integer in \[1, 1024\]"
    ):
        read_checkpoint(path)
    write_fake_recbole_checkpoint(path, sd, hidden_size=16, d_state=8, num_layers=1000)
    with pytest.raises(UsageError, match="num_layers = 1000 but the weights hold 1 layer"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------------- bad values


def _recbole_with(path: Path, **config: object) -> Path:
    from test_checkpoint import write_fake_recbole_checkpoint

    write_fake_recbole_checkpoint(
        path, tiny_model().state_dict(), **{"hidden_size": 16, "d_state": 8, **config}
    )
    return path


BAD_VALUES = {
    "n_items=1e11": (lambda p: _own_checkpoint_with_config(p, n_items=1e11), "n_items"),
    "d_state=-5": (lambda p: _own_checkpoint_with_config(p, d_state=-5), r"d_state = -5 is out of range"),
    "hidden_size='64'": (
        lambda p: _own_checkpoint_with_config(p, hidden_size="64"),
        r"hidden_size is '64' \(str\)",
    ),
    "dropout_prob=5.0": (lambda p: _own_checkpoint_with_config(p, dropout_prob=5.0), r"dropout_prob = 5\.0"),
    "meta.max_seq_len=1e9": (None, r"meta\.max_seq_len"),
    "recbole hidden_size='abc'": (lambda p: _recbole_with(p, hidden_size="abc"), r"hidden_size is 'abc'"),
    "one byte 0x80": (lambda p: p.write_bytes(b"\x80") and p, "bare pickle"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_value_is_one_line_error_exit_2(case: str, tmp_path: Path) -> None:
    """Issue 8 item 3: each bad value is a one-line `Error:` naming the field (and range), exit 2."""
    make, pattern = BAD_VALUES[case]
    path = tmp_path / "bad.pt"
    if make is None:
        save_checkpoint(path, tiny_model(), None, {"max_seq_len": 1e9})
    else:
        make(path)
    result = CliRunner().invoke(main, ["export", "--ckpt", str(path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    import re

    assert re.search(pattern, lines[0]), lines[0]
    if case != "one byte 0x80":
        assert "allowed" in lines[0] or "must be" in lines[0], lines[0]


# ---------------------------------------------------------------------------- not regular files


def test_non_regular_ckpt_says_what_it_is(tmp_path: Path) -> None:
    """Issue 8 item 4: a directory, a FIFO, /dev/zero: named as such, never read."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # reading it would block forever
    cases = {tmp_path: "is a directory", fifo: "is a FIFO", Path("/dev/zero"): "is a character device"}
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            read_checkpoint(path)
    with pytest.raises(UsageError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
