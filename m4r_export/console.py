"""Terminal output helpers shared by the commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table


def titled_table(title: str, **kwargs: Any) -> Table:
    """A ``rich.table.Table`` at least as wide as its title (up to the terminal's width).

    Rich wraps a title to the width of its table, so a narrow table (three short columns) split
    titles mid-word and paths mid-name even in an 80-column terminal; a title only wraps now when
    it is wider than the terminal, and then between words.
    """
    from rich.table import Table

    return Table(title=title, min_width=len(title), **kwargs)
