"""The wheel's explicit package list (needed to ship plugins/) must not miss a subpackage."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "m4r_export").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["m4r_export._plugins"] == "plugins"
    assert (ROOT / "plugins" / "CMakeLists.txt").is_file()


def test_plots_work_in_the_default_install() -> None:
    # `pip install . && m4r demo` writes PNGs: matplotlib cannot be an extra
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)
