"""The circuits package's vocabulary: cells, sets of cells, and the direction of a multi-cell patch.

Positions are *end-aligned columns*, as in the heatmaps: with examples of different lengths aligned at their last
token (the answer position), column ``c`` of a frame ``n_columns`` wide is token ``c - (n_columns - length)`` of an
example of ``length`` tokens; a column before an example's first token does not exist for that example and a patch
there does nothing to it. ``n_columns`` is the longest example's length unless given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

#: sufficiency: the corrupt run with the clean z of the set's cells; necessity: the clean run with their corrupt z
Direction = Literal["sufficiency", "necessity"]
DIRECTIONS: tuple[str, ...] = ("sufficiency", "necessity")


@dataclass(frozen=True, order=True)
class Cell:
    """One head at one position: its activation is z, the head's slice of the attention output projection's input
    (as in the head sweep). ``position``: an end-aligned column (module docstring)."""

    layer: int
    head: int
    position: int

    def label(self, position_labels: Sequence[str] | None = None) -> str:
        where = position_labels[self.position] if position_labels is not None else f"pos {self.position}"
        return f"L{self.layer}H{self.head}@{where}"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "position": self.position}


def token_index(column: int, length: int, n_columns: int) -> int | None:
    """Token index of an end-aligned ``column`` in an example of ``length`` tokens; None where it has no such token."""
    index = column - (n_columns - length)
    return index if 0 <= index < length else None


def frame_columns(pairs, n_columns: int | None) -> int:
    """The frame's width: ``n_columns``, or the longest example's length. A narrower frame would move every column
    of the longer examples onto other tokens, so it is refused."""
    if not pairs:
        raise ValueError("no examples: pairs is empty")
    longest = max(len(p.clean_ids) for p in pairs)
    n_columns = longest if n_columns is None else n_columns  # (0 is refused below, not read as "the longest")
    if n_columns < longest:
        raise ValueError(f"n_columns={n_columns} is shorter than the longest example ({longest} tokens)")
    return n_columns


def check_cell(cell: Cell, n_layers: int, n_heads: int, n_columns: int, what: str = "cell") -> None:
    """A clear error for a cell outside the model or the frame (negative indices too: they would silently mean
    the last layer or head)."""
    if not (0 <= cell.layer < n_layers and 0 <= cell.head < n_heads and 0 <= cell.position < n_columns):
        raise ValueError(f"{what} {cell} is outside the model ({n_layers} layers x {n_heads} heads) or the "
                         f"{n_columns} columns")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {DIRECTIONS}")
    return direction
