"""Names a manifest gives, and the bytes readers load (issue 20 items 1 and 5).

* Every file name a reader takes from ``manifest.json`` (``files``, ``streaming.files``,
  ``tensorrt.engine``) must be a plain name listed and hashed in ``files``: anything else is exit
  code 3 naming it, before a byte is read or written. Symlinked files and manifests are refused.
* Readers load the very bytes they hashed: an export republished between the hash and the load
  (a hook swaps the directory at exactly that point) never gives a mix of two exports.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from m4r_export.checkpoint import save_checkpoint
from m4r_export.cli import main
from m4r_export.fileio import publish_directory
from m4r_export.onnx.export import ExportOptions, export_artifacts
from m4r_export.verify.testing import rehash_manifest, tiny_model

N_ITEMS, MAX_SEQ = 40, 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A streaming export A with its checkpoint, and B: A with other weights (rows of every graph's
    item table reversed), hashed like a real export."""
    root = tmp_path_factory.mktemp("trust")
    model = tiny_model(N_ITEMS, seed=1)
    save_checkpoint(root / "a.pt", model, None, {"max_seq_len": MAX_SEQ})
    opts = ExportOptions(head="topk", k=5, max_seq_len=MAX_SEQ, streaming=True)
    export_artifacts(model, root / "a", opts, checkpoint_path=root / "a.pt", build_trt=False)
    shutil.copytree(root / "a", root / "b")
    for path in (root / "b").glob("*.onnx"):
        proto = onnx.load(str(path))
        table = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
        table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table)[::-1].copy(), table.name))
        onnx.save(proto, str(path))
    rehash_manifest(root / "b")
    return {"a": root / "a", "a.pt": root / "a.pt", "b": root / "b"}


def _cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _edit(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 20.1: names


@pytest.mark.parametrize("absolute", [False, True], ids=["traversal", "absolute"])
def test_triton_streaming_never_follows_a_name_out_of_its_directory(
    exports: dict[str, Path], tmp_path: Path, absolute: bool
) -> None:
    art = _copy(exports["a"], tmp_path / "deep" / "er" / "art")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    name = str(victim) if absolute else "../../../victim.txt"

    def point(m: dict[str, Any]) -> None:
        m["streaming"]["files"]["fp32"]["init"] = name

    _edit(art, point)
    repo = tmp_path / "repo"
    code, out = _cli("triton", "--streaming", "--artifacts", art, "--repo", repo)
    assert code == 3, out
    assert f"streaming.files.fp32.init names {name!r}" in out and "Traceback" not in out
    assert victim.read_text() == "precious\n" and not repo.exists()


def test_streaming_session_loads_only_listed_hashed_files(exports: dict[str, Path], tmp_path: Path) -> None:
    from m4r_export.integrity import ArtifactIntegrityError
    from m4r_export.streaming import StreamingSession

    art = _copy(exports["a"], tmp_path / "art")
    _edit(art, lambda m: m["files"].pop("init.onnx"))  # init.onnx present but no longer hashed
    with pytest.raises(ArtifactIntegrityError, match="'init.onnx', which is not a plain file name listed"):
        StreamingSession.from_dir(art)


def test_engine_name_from_the_manifest_must_be_listed(exports: dict[str, Path], tmp_path: Path) -> None:
    art = _copy(exports["a"], tmp_path / "art")
    _edit(art, lambda m: m["tensorrt"].update(status="built", engine="../model.plan"))
    code, out = _cli("verify", "--artifact", art / "model.onnx", "--ckpt", exports["a.pt"], "--k", 5)
    assert code == 3 and "tensorrt.engine names '../model.plan'" in out, out


@pytest.mark.parametrize("which", ["items.txt", "manifest.json"])
def test_symlinked_files_are_refused(exports: dict[str, Path], tmp_path: Path, which: str) -> None:
    art = _copy(exports["a"], tmp_path / "art")
    real = tmp_path / f"real-{which}"
    os.replace(art / which, real)
    os.symlink(real, art / which)  # same bytes, but through a link
    code, out = _cli("verify", "--artifact", art / "model.onnx", "--ckpt", exports["a.pt"], "--k", 5)
    assert code == 3, out
    assert f"{which} is a symbolic link" in out


# ------------------------------------------------------------------- 20.5: hash and load


def _republish_between_hash_and_load(
    monkeypatch: pytest.MonkeyPatch, modules: list[Any], target: Path, other: Path
) -> list[int]:
    """Right after the reader hashed ``target``, replace it (atomically) with the export ``other``."""
    swaps: list[int] = []
    names = ("open_artifact", "check_artifact_files")  # the reader's hash step (now / before the fix)
    for module in modules:
        for name in names:
            real = getattr(module, name, None)
            if real is None:
                continue

            def hooked(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                result = _real(*args, **kwargs)
                if not swaps:
                    files = {p.name: p.read_bytes() for p in other.iterdir()}
                    publish_directory(target, files, replaceable=lambda _d: True)
                    swaps.append(1)
                return result

            monkeypatch.setattr(module, name, hooked)
    return swaps


def test_verify_loads_the_export_it_hashed(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import m4r_export.verify.artifact as artifact_mod

    def verify(d: Path) -> tuple[int, str]:
        args = ["--artifact", d / "model.onnx", "--ckpt", exports["a.pt"], "--users", 20, "--k", 5]
        return _cli("verify", *args)

    assert verify(exports["b"])[0] == 1  # B's model against A's checkpoint: parity fails
    art = _copy(exports["a"], tmp_path / "art")
    swaps = _republish_between_hash_and_load(monkeypatch, [artifact_mod], art, exports["b"])
    code, out = verify(art)
    assert swaps == [1]
    assert code == 0, out  # A's manifest and A's model: parity with A passes


def test_streaming_session_loads_the_export_it_hashed(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import m4r_export.integrity as integrity_mod
    import m4r_export.onnx.manifest as manifest_mod
    from m4r_export.streaming import StreamingSession

    expected = StreamingSession.from_dir(exports["a"]).start([[3, 17, 9], [5]])
    art = _copy(exports["a"], tmp_path / "art")
    swaps = _republish_between_hash_and_load(monkeypatch, [manifest_mod, integrity_mod], art, exports["b"])
    got = StreamingSession.from_dir(art).start([[3, 17, 9], [5]])
    assert swaps == [1]
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_triton_copies_the_export_it_hashed(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import m4r_export.serve.repository as repository_mod

    art = _copy(exports["a"], tmp_path / "art")
    swaps = _republish_between_hash_and_load(monkeypatch, [repository_mod], art, exports["b"])
    code, out = _cli("triton", "--artifacts", art, "--repo", tmp_path / "repo", "--with-tokens")
    assert swaps == [1]
    assert code == 0, out
    copied = (tmp_path / "repo" / "m4r_topk" / "1" / "model.onnx").read_bytes()
    assert copied == (exports["a"] / "model.onnx").read_bytes()


# ----------------------------------------------- external data: loaded from the checked side file


def _to_external_data(art: Path, side: str = "model.onnx.data") -> None:
    """model.onnx with its weights in ``side``, listed under its entry's ``external_data``."""
    proto = onnx.load(str(art / "model.onnx"))
    onnx.save_model(
        proto, str(art / "model.onnx"), save_as_external_data=True, location=side, size_threshold=0
    )
    rehash_manifest(art)
    _edit(art, lambda m: m["files"]["model.onnx"].update(external_data=[side]))


def test_external_data_comes_from_the_hashed_side_file(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = _copy(exports["a"], tmp_path / "art")
    _to_external_data(art)
    assert (art / "model.onnx.data").stat().st_size > 10_000  # the weights moved out of model.onnx
    monkeypatch.chdir(tmp_path)  # ONNX Runtime itself would look for the side file here: it must not
    # tensors above 1 KiB (the 2.5 KB item table) go through add_external_initializers
    monkeypatch.setattr("m4r_export.onnx.manifest.INLINE_EXTERNAL_BYTES", 1024)
    args = ["--artifact", art / "model.onnx", "--ckpt", exports["a.pt"], "--users", 20, "--k", 5]
    code, out = _cli("verify", *args)
    assert code == 0, out
    data = bytearray((art / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (art / "model.onnx.data").write_bytes(bytes(data))
    code, out = _cli("verify", *args)
    assert code == 3 and "model.onnx.data does not match its sha256" in out, out


def test_external_data_named_outside_the_directory_is_refused(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    art = _copy(exports["a"], tmp_path / "art")
    _to_external_data(art)
    _edit(art, lambda m: m["files"]["model.onnx"].update(external_data=["../model.onnx.data"]))
    code, out = _cli("verify", "--artifact", art / "model.onnx", "--ckpt", exports["a.pt"], "--k", 5)
    assert code == 3 and "external_data names '../model.onnx.data'" in out, out


def test_engine_manifest_naming_an_onnx_file_elsewhere_is_refused(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    from m4r_export.trt.manifest import MANIFEST_FORMAT

    _copy(exports["a"], tmp_path / "a")  # a real export next to the engine's directory
    (tmp_path / "eng").mkdir()
    (tmp_path / "eng" / "model.plan").write_bytes(b"engine")
    onnx_file = {"file": "../a/model.onnx", "sha256": "0" * 64}
    meta = {"format": MANIFEST_FORMAT, "onnx": onnx_file}
    (tmp_path / "eng" / "model.plan.json").write_text(json.dumps(meta))
    engine = tmp_path / "eng" / "model.plan"
    code, out = _cli("verify", "--artifact", engine, "--ckpt", exports["a.pt"], "--k", 5)
    assert code == 3 and "not a plain file name beside the engine" in out, out
