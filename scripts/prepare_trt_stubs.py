#!/usr/bin/env python3
"""Copy the tensorrt-stubs type stubs into a typings/ folder that mypy can parse.

tensorrt-stubs 10.13 (install it with ``pip install --no-deps tensorrt-stubs``: it pins the tensorrt
sdist, which cannot install here) ships ``tensorrt/`` and ``tensorrt_bindings/`` as .pyi files that
mypy cannot use as is:

* parameters named ``in`` (a keyword) in the plugin classes: renamed ``in_``;
* ``add_scale_nd`` declares the non-default ``channel_axis`` after defaulted parameters: given ``= ...``;
* ``tensorrt/`` has no py.typed, so mypy would not use it from site-packages anyway.

The copies go to ``typings/`` (git-ignored), each file starting with ``# mypy: ignore-errors`` so that
mypy checks *our* use of the API against them without reporting the stubs' own sloppiness. Then::

    MYPYPATH=typings mypy m4r_export/trt

Usage: python scripts/prepare_trt_stubs.py [--out typings]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
# `in` as a parameter name: "(self, in: list[...]" or ", in: ..." -> "in_:"
_IN_PARAM = re.compile(r"([(,]\s*)in(\s*:)")
_SCALE_ND = re.compile(r"(def add_scale_nd\(.*?channel_axis: int)(\))")
HEADER = (
    "# mypy: ignore-errors\n# Repaired copy of tensorrt-stubs (scripts/prepare_trt_stubs.py); do not edit.\n"
)


def find_stub_dir(package: str) -> Path:
    """Locate an installed stub-only package (importlib cannot import it, so look at its spec)."""
    for entry in sys.path:
        candidate = Path(entry) / package
        if (candidate / "__init__.pyi").is_file():
            return candidate
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "__init__.pyi").is_file():
                return Path(loc)
    raise SystemExit(
        f"error: stub package {package!r} not found; install it with: pip install --no-deps tensorrt-stubs"
    )


def repair(text: str) -> str:
    lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("def "):
            line = _IN_PARAM.sub(r"\1in_\2", line)
            line = _SCALE_ND.sub(r"\1 = ...\2", line)
        lines.append(line)
    return HEADER + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("typings"), help="output folder (default: typings)")
    args = parser.parse_args(argv)
    out: Path = args.out
    for package in PACKAGES:
        src = find_stub_dir(package)
        dst = out / package
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for pyi in sorted(src.glob("*.pyi")):
            (dst / pyi.name).write_text(repair(pyi.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"{src} -> {dst} ({len(list(dst.glob('*.pyi')))} stub files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
