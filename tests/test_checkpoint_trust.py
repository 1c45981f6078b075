"""Hostile checkpoints of issue 20: memory claims (item 2), deep nesting (item 8), protocol-2 names
(item 10), and the config-vs-tensors guard inside ``Checkpoint.build_model`` (item 13).

The files are written by hand (a pickler whose tensors name storage records we choose, records
stored or deflated as we choose), so each claims exactly what the attack needs.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from m4r_export import checkpoint as ckpt_mod
from m4r_export.checkpoint import Checkpoint, read_checkpoint
from m4r_export.cli import main
from m4r_export.errors import UsageError
from m4r_export.model import Mamba4Rec, Mamba4RecConfig

# ------------------------------------------------------------------------- hand-written torch zips


class Storage:
    """A storage record ``data/<key>`` of ``numel`` float32 values, named by a persistent id."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class FakeTensor:
    """Pickles as torch.save pickles a tensor: ``_rebuild_tensor_v2(storage, offset, size, stride)``."""

    def __init__(self, storage: Storage, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self) -> Any:
        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_zip(
    path: Path, payload: Any, records: dict[str, Iterable[bytes]], deflate: Iterable[str] = ()
) -> Path:
    """A torch zip checkpoint: ``payload`` pickled (protocol 2) plus the given storage records."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(payload)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", b"little")
        for key, chunks in records.items():
            method = zipfile.ZIP_DEFLATED if key in deflate else zipfile.ZIP_STORED
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = method
            # level 1 (fast): the attribute is `_compresslevel` up to Python 3.12, `compress_level` after
            setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", 1)
            with z.open(info, "w", force_zip64=True) as out:
                for chunk in chunks:
                    out.write(chunk)
        z.writestr("archive/version", b"3\n")
    return path


def own_payload(model: Mamba4Rec, config: dict[str, Any], replace: dict[str, FakeTensor] | None = None):
    """(payload, records) of an own-format checkpoint of ``model``; replaced tensors' records are the
    caller's to add."""
    records: dict[str, Iterable[bytes]] = {}
    state: dict[str, Any] = collections.OrderedDict()
    for i, (name, t) in enumerate(model.state_dict().items()):
        if replace and name in replace:
            state[name] = replace[name]
            continue
        st = Storage(str(i), t.numel())
        records[st.key] = [t.contiguous().numpy().tobytes()]
        state[name] = FakeTensor(st, tuple(t.shape), tuple(t.stride()))
    payload = {
        "format": "m4r-checkpoint",
        "format_version": 1,
        "config": {**model.config.to_dict(), **config},
        "state_dict": state,
        "item_tokens": None,
        "meta": {},
    }
    return payload, records


def model64() -> Mamba4Rec:
    torch.manual_seed(0)
    return Mamba4Rec(30, hidden_size=64, d_state=8)


# Peak RSS of the child's own address space (VmHWM), as in test_checkpoint_hostile.py.
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


def peak_of_loading(path: Path) -> tuple[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert "PEAK_MB" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    out, peak = proc.stdout.split("PEAK_MB")
    return out.strip(), float(peak)


def stride0(path: Path, n_items: int) -> Path:
    """One stored float expanded (stride 0) into an n_items x 64 item table."""
    fake = FakeTensor(Storage("emb", 1), (n_items, 64), (0, 0))
    payload, records = own_payload(model64(), {"n_items": n_items}, {"item_embedding.weight": fake})
    records["emb"] = [bytes(4)]
    return write_zip(path, payload, records)


def overlapping(path: Path, n_items: int) -> Path:
    """Rows overlapping by 63 of 64 values (stride (1, 1)): 4 bytes of data per claimed row."""
    fake = FakeTensor(Storage("emb", n_items + 63), (n_items, 64), (1, 1))
    payload, records = own_payload(model64(), {"n_items": n_items}, {"item_embedding.weight": fake})
    records["emb"] = [bytes(4 * (n_items + 63))]
    return write_zip(path, payload, records)


def deflated(path: Path, n_items: int) -> Path:
    """A genuine n_items x 64 item table, all zeros, stored deflated (1 GiB -> 4.7 MB at level 1)."""
    st = Storage("emb", n_items * 64)
    fake = FakeTensor(st, (n_items, 64), (64, 1))
    payload, records = own_payload(model64(), {"n_items": n_items}, {"item_embedding.weight": fake})
    zeros = bytes(1 << 22)
    records["emb"] = (zeros for _ in range(n_items * 64 * 4 // len(zeros)))
    return write_zip(path, payload, records, deflate={"emb"})


HOSTILE = {
    "stride0-4M": (lambda p: stride0(p, 4_000_000), "claims shape (4000000, 64)"),
    "stride0-20M": (lambda p: stride0(p, 20_000_000), "claims shape (20000000, 64)"),
    "overlap-4M": (lambda p: overlapping(p, 4_000_000), "claims shape (4000000, 64)"),
    "deflated-1GiB": (lambda p: deflated(p, 1 << 22), "is compressed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_memory_claims_are_refused_under_300_mb(case: str, tmp_path: Path) -> None:
    """Issue 20 item 2: stride-0 / overlapping / deflated item tables are refused before allocating."""
    make, message = HOSTILE[case]
    path = make(tmp_path / "bomb.pt")
    assert path.stat().st_size < 20_000_000
    out, peak = peak_of_loading(path)
    assert out.startswith("ERROR") and message in out, out
    assert peak < 300, f"peak RSS {peak:.0f} MB"


def test_hostile_memory_claim_is_one_line_error_from_export(tmp_path: Path) -> None:
    """Issue 20 item 2: `m4r export` with a stride-0 item table says so in one line, exit 2."""
    path = stride0(tmp_path / "bomb.pt", 20_000_000)
    result = CliRunner().invoke(main, ["export", "--ckpt", str(path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "item_embedding.weight" in lines[0] and "exhaust memory" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_honest_hand_written_checkpoint_still_loads(tmp_path: Path) -> None:
    """The hand-written zips are real checkpoints when honest (the refusals are not format errors)."""
    model = model64()
    payload, records = own_payload(model, {})
    loaded = read_checkpoint(write_zip(tmp_path / "ok.pt", payload, records)).build_model()
    seq, lens = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    assert torch.equal(loaded(seq, lens), model.eval()(seq, lens))


def test_tensors_sharing_one_storage_cannot_claim_more_than_it_holds() -> None:
    """Issue 20 item 2: every tensor may lie within its storage, yet together claim it twice."""
    base = torch.zeros(4, 8)
    ckpt_mod.check_tensor_data({"a": base[:2], "b": base[2:]}, "x")  # disjoint views of one storage: fine
    twice = {"a": base, "b": base.view(8, 4)}
    with pytest.raises(UsageError, match="claim 256 bytes but share 128 bytes"):
        ckpt_mod.check_tensor_data(twice, "x")
    with pytest.raises(UsageError, match=r"claims shape \(5, 8\)"):
        ckpt_mod.check_tensor_data({"a": base[:1].expand(5, 8)}, "x")


# ------------------------------------------------------------------------------- deep nesting


SENTINEL = "N_ITEMS_SENTINEL_0123456789"


def deep_list_ops(depth: int) -> bytes:
    """Pickle opcodes building a ``depth``-deep list [[[...]]]: 2 bytes per level."""
    return b"]" * depth + b"a" * (depth - 1)


def splice(path: Path, replacement: bytes) -> Path:
    """Replace the pickled SENTINEL string in ``path``'s data.pkl with ``replacement`` opcodes."""
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    raw = SENTINEL.encode()
    opcode = b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE (protocol 2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert data.count(opcode) == 1
                data = data.replace(opcode, replacement)
            z.writestr(info, data)
    return path


def own_with_n_items(path: Path, replacement: bytes) -> Path:
    payload, records = own_payload(model64(), {"n_items": SENTINEL})
    return splice(write_zip(path, payload, records), replacement)


def recbole_with_hidden_size(path: Path, replacement: bytes) -> Path:
    write_recbole(path, model64().state_dict(), hidden_size=SENTINEL, d_state=8)
    return splice(path, replacement)


@pytest.mark.parametrize("fmt", ["own", "recbole"])
def test_deeply_nested_config_value_is_refused_without_recursion(fmt: str, tmp_path: Path) -> None:
    """Issue 20 item 8: a 200,000-deep list as a config value: refused by depth, one line, exit 2."""
    make = own_with_n_items if fmt == "own" else recbole_with_hidden_size
    path = make(tmp_path / "deep.pt", deep_list_ops(200_000))
    assert path.stat().st_size < 1_000_000  # of which 400 KB of nesting opcodes
    with pytest.raises(UsageError, match="nests containers more than 100 levels deep"):
        read_checkpoint(path)
    result = CliRunner().invoke(main, ["export", "--ckpt", str(path), "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "levels deep" in lines[0], result.output


def test_shallow_nesting_still_gets_the_field_error(tmp_path: Path) -> None:
    """Below the limit, a list where a number belongs is named as before (briefly, not repr'd)."""
    path = own_with_n_items(tmp_path / "shallow.pt", deep_list_ops(50))
    with pytest.raises(UsageError, match=r"n_items is <list of 1> \(list\); it must be an integer"):
        read_checkpoint(path)
    # LONG1 of 200 bytes: an integer too long to print (Python refuses str() beyond 4300 digits)
    path = own_with_n_items(tmp_path / "huge.pt", b"\x8a" + bytes([200]) + b"\x01" * 200)
    with pytest.raises(UsageError, match=r"n_items = <an integer of 1593 bits> is out of range"):
        read_checkpoint(path)


def test_deep_tuple_dict_key_is_refused_in_a_child_that_survives(tmp_path: Path) -> None:
    """Issue 20 item 8: hashing a 200,000-deep tuple (a dict key) crashes CPython; refuse first."""
    ops = b"}" + b")" + b"\x85" * 200_000 + b"K\x01s"  # {((((...)))): 1}: EMPTY_DICT, TUPLE1 x N, SETITEM
    path = own_with_n_items(tmp_path / "deep-key.pt", ops)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "nests tuples more than 100 levels deep" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------ protocol-2 RecBole names


def write_recbole(
    path: Path, state_dict: dict[str, torch.Tensor], legacy_reduce: bool = False, **config: Any
) -> None:
    """A stand-in RecBole Config pickled by torch.save (protocol 2).

    ``legacy_reduce``: the Config reduces as protocol 0/1 objects do (``copyreg._reconstructor``),
    which a protocol-2 pickler writes under its Python 2 name ``copy_reg._reconstructor``.
    """
    names = ["recbole", "recbole.config", "recbole.config.configurator"]
    mods = {n: types.ModuleType(n) for n in names}

    class Config:
        def __init__(self) -> None:
            self.final_config_dict = {"model": "Mamba4Rec", **config}

        if legacy_reduce:

            def __reduce_ex__(self, protocol: Any) -> Any:
                return copyreg._reduce_ex(self, 0)  # type: ignore[attr-defined]

    Config.__module__ = "recbole.config.configurator"
    Config.__qualname__ = "Config"
    mods["recbole.config.configurator"].Config = Config  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        torch.save({"config": Config(), "epoch": 3, "state_dict": state_dict, "optimizer": {}}, path)
    finally:
        for n in names:
            del sys.modules[n]


def test_protocol2_python2_names_map_onto_the_allowlist(tmp_path: Path) -> None:
    """Issue 20 item 10: `__builtin__.set`, `__builtin__.object`, `copy_reg._reconstructor` load."""
    torch.manual_seed(0)
    model = Mamba4Rec(30, hidden_size=16, d_state=8)
    path = tmp_path / "rb.pth"
    metrics = {"recall", "ndcg"}  # RecBole configs hold sets (e.g. of metric names)
    write_recbole(path, model.state_dict(), legacy_reduce=True, hidden_size=16, d_state=8, metric_set=metrics)
    pkl = _data_pkl(path)
    for name in (b"c__builtin__\nset\n", b"ccopy_reg\n_reconstructor\n", b"c__builtin__\nobject\n"):
        assert name in pkl, name  # the file really uses the Python 2 names
    ck = read_checkpoint(path)
    assert ck.source_format == "recbole" and ck.config.hidden_size == 16
    assert ck.meta["epoch"] == 3
    seq, lens = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    assert torch.equal(ck.build_model()(seq, lens), model.eval()(seq, lens))


def test_python2_names_outside_the_allowlist_are_still_refused(tmp_path: Path) -> None:
    """The mapping adds no name: `__builtin__.eval` maps to builtins.eval and is refused as before."""
    from test_checkpoint_hostile import zip_checkpoint

    payload = b"\x80\x02c__builtin__\neval\nX\x04\x00\x00\x001+1;\x85R."
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match="builtins.eval"):
        read_checkpoint(zip_checkpoint(tmp_path / "evil.pt", payload))


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        return z.read(name)


# ------------------------------------------------------------ item 13: the guard in build_model


def test_build_model_checks_config_against_tensors_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20 item 13: `Checkpoint` is public; its build_model must refuse a config that contradicts
    the tensors before constructing (allocating) the module: a 2-billion-row config with a small table
    must never reach Mamba4Rec.from_config."""
    torch.manual_seed(0)
    small = Mamba4Rec(30, hidden_size=16, d_state=8).state_dict()
    built: list[Mamba4RecConfig] = []

    def spy(config: Mamba4RecConfig) -> Mamba4Rec:
        built.append(config)
        raise AssertionError(f"a model of {config.n_items} items was built before the check")

    monkeypatch.setattr(ckpt_mod.Mamba4Rec, "from_config", staticmethod(spy))
    lying = Checkpoint(Mamba4RecConfig(n_items=2**31 - 1, hidden_size=16, d_state=8), small)
    with pytest.raises(UsageError, match="come from different models"):
        lying.build_model()
    assert built == []
    repeated = dict(small, **{"item_embedding.weight": small["item_embedding.weight"][:1].expand(10**6, 16)})
    with pytest.raises(UsageError, match="exhaust memory"):
        Checkpoint(Mamba4RecConfig(n_items=10**6, hidden_size=16, d_state=8), repeated).build_model()
    assert built == []


def test_nesting_check_counts_shared_containers_at_their_deepest() -> None:
    """A container met first near the top and again deep down counts at its deepest; cycles refused."""

    def chain(depth: int, leaf: Any) -> list[Any]:
        node: list[Any] = [leaf]
        for _ in range(depth - 1):
            node = [node]
        return node

    shared = chain(50, 0)  # 50 levels
    ckpt_mod.check_nesting({"a": shared}, "x")  # 51 levels
    with pytest.raises(UsageError, match="more than 100 levels deep"):
        ckpt_mod.check_nesting([shared, chain(60, shared)], "x")  # 1 + 60 + 50 levels
    ckpt_mod.check_nesting([shared, chain(40, shared)], "x")  # 91 levels
    loop: list[Any] = []
    loop.append([loop])
    with pytest.raises(UsageError, match="contains itself"):
        ckpt_mod.check_nesting({"k": loop}, "x")
