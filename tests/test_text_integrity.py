"""Issue 8 item 10: interaction files decode strictly; items.txt tokens cannot split under any reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from m4r_export.data import read_interactions
from m4r_export.errors import UsageError
from m4r_export.onnx import export as ex
from m4r_export.verify.testing import tiny_model

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def test_invalid_utf8_names_the_line_instead_of_mojibake(tmp_path: Path) -> None:
    path = tmp_path / "bad.inter"
    rows = ["u1\t日本語_1\t1", "u1\tb\t2", "u2\tc\t3"]
    data = (HEADER + "\n".join(rows) + "\n").encode("utf-8") + b"u2\tcaf\xe9\t4\n"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=r"line 5, byte 7 \(0xe9\) is not valid utf-8"):
        read_interactions(path)


def test_valid_utf8_and_explicit_encodings_read_exactly(tmp_path: Path) -> None:
    good = tmp_path / "good.inter"
    good.write_bytes((HEADER + "u1\t日本語_1\t1\nu1\tcafé\t2\n").encode("utf-8"))
    assert read_interactions(good).items == ["日本語_1", "café"]
    latin = tmp_path / "latin.inter"
    latin.write_bytes((HEADER + "u1\tcafé\t1\n").encode("latin-1"))
    assert read_interactions(latin, encoding="latin-1").items == ["café"]
    with pytest.raises(UsageError, match="unknown text encoding"):
        read_interactions(latin, encoding="no-such-codec")


#: every character str.splitlines() splits on, beyond the \n and \r the old check knew
BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", BREAKS, ids=[f"U+{ord(c):04X}" for c in BREAKS])
def test_items_txt_refuses_every_line_break_character(char: str) -> None:
    model = tiny_model(5)
    model.item_tokens = ["[PAD]", "a", f"b{char}c", "d", "e"]
    with pytest.raises(UsageError, match=f"U\\+{ord(char):04X}"):
        ex.check_item_tokens(model)


def test_items_txt_round_trips_under_splitlines(tmp_path: Path) -> None:
    model = tiny_model(5)
    model.item_tokens = ["[PAD]", "日本語_1", "a b", "tab\there", "é"]
    ex.check_item_tokens(model)
    ex.write_items_file(model, tmp_path / "items.txt")
    text = (tmp_path / "items.txt").read_bytes().decode("utf-8")
    assert text.splitlines() == model.item_tokens
    assert text.split("\n")[:-1] == model.item_tokens


def test_items_txt_is_written_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk boundaries lose or repeat no line, with and without a checkpoint vocabulary."""
    monkeypatch.setattr(ex, "ITEMS_CHUNK", 3)
    model = tiny_model(8)
    ex.write_items_file(model, tmp_path / "index.txt")
    assert (tmp_path / "index.txt").read_text("utf-8").split("\n") == ["[PAD]", *map(str, range(1, 8)), ""]
    model.item_tokens = ["[PAD]", *(f"item-{i}" for i in range(1, 8))]
    ex.write_items_file(model, tmp_path / "tokens.txt")
    assert (tmp_path / "tokens.txt").read_text("utf-8").splitlines() == model.item_tokens
