"""The public Python API at the package root: lazy, complete, and the documented example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import m4r_export

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_name_in_all_imports() -> None:
    required = {
        "Mamba4Rec", "load_checkpoint", "read_checkpoint", "save_checkpoint", "ServingModel",
        "ExportOptions", "export_artifacts", "run_verify", "histories_to_inputs", "truncate_inputs",
    }  # fmt: skip
    assert required <= set(m4r_export.__all__)
    assert set(m4r_export.__all__) == set(m4r_export._EXPORTS)
    # in a fresh interpreter, so nothing was imported before: every name resolves to a real object
    out = _python(
        "import m4r_export as m\n"
        "missing = [n for n in m.__all__ if getattr(m, n, None) is None]\n"
        "exec('from m4r_export import *')\n"
        "print(missing, all(n in dir(m) for n in m.__all__))"
    )
    assert out == "[] True"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = m4r_export.nope  # type: ignore[attr-defined]


def test_names_are_the_defining_modules_objects() -> None:
    from m4r_export.checkpoint import load_checkpoint
    from m4r_export.model import Mamba4Rec
    from m4r_export.onnx.export import export_artifacts

    assert m4r_export.Mamba4Rec is Mamba4Rec
    assert m4r_export.load_checkpoint is load_checkpoint
    assert m4r_export.export_artifacts is export_artifacts


def test_package_import_and_cli_help_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import m4r_export\n"
        "from m4r_export.cli import main\n"
        "try:\n"
        "    main.main(['--help'], prog_name='m4r')\n"
        "except SystemExit:\n"
        "    pass\n"
        "try:\n"
        "    main.main(['export', '--help'], prog_name='m4r')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH', sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = _python(code)
    assert out.splitlines()[-1] == "TORCH []"


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_python_api_doc_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _doc_blocks()
    assert len(blocks) == 1, "docs/python-api.md should hold exactly one runnable python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__doc_example__"})
    export = tmp_path / "api-demo" / "export"
    assert (export / "model.onnx").stat().st_size > 0
    assert (export / "manifest.json").is_file()
