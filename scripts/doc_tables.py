"""Regenerate the measured tables in README.md and docs/streaming.md from the bench JSON beside them.

    python scripts/doc_tables.py            # rewrite the tables between the markers
    python scripts/doc_tables.py --check    # exit 1 when a table differs from its JSON

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; NAME picks the JSON
(docs/bench/NAME.json, written by the command recorded in it) and the renderer. A re-measurement is:
run the bench with ``--json docs/bench/NAME.json``, then this script; tests/test_doc_tables.py fails
when the docs and the JSON disagree, so the docs cannot drift from the measurement.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's m4r_export, whatever is installed
DOCS = (ROOT / "README.md", ROOT / "docs" / "streaming.md")


def renderers() -> dict[str, Callable[[dict[str, Any]], str]]:
    from m4r_export.verify import bench_streaming as bs

    return {"streaming": bs.summary_table, "streaming-full": bs.render_table}


def json_for(name: str) -> dict[str, Any]:
    base = name.split("-")[0]
    return json.loads((ROOT / "docs" / "bench" / f"{base}.json").read_text())


def regenerate(text: str) -> str:
    """``text`` with every marked table rendered from its JSON."""
    render = renderers()

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"<!-- table:{name} -->\n{render[name](json_for(name))}\n<!-- /table:{name} -->"

    return re.sub(r"<!-- table:([\w-]+) -->\n(?:.*?\n)?<!-- /table:\1 -->", sub, text, flags=re.S)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for doc in DOCS:
        old = doc.read_text()
        new = regenerate(old)
        if new != old:
            stale.append(doc)
            if not check:
                doc.write_text(new)
    if check and stale:
        print(f"stale tables in {', '.join(map(str, stale))}: run python scripts/doc_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
