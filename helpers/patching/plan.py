"""The plan of one sweep forward: which rows join at which layer, and the patch each layer applies."""
from __future__ import annotations

from typing import NamedTuple

import torch

from helpers.patching.grouping import MaskNotPassedOn


class Patch(NamedTuple):
    """The rows one layer patches at its site: row ``batch_idx`` [n], position ``rel_pos`` [n], unit ``unit`` [n]
    gets ``values`` [n, unit_width]. ``flat`` [n]: the same places as rows of the site's tensor viewed
    [batch * q * units, unit_width] (``q``: the forward's fed tokens), so one ``index_copy_`` writes them."""

    batch_idx: torch.Tensor
    rel_pos: torch.Tensor
    unit: torch.Tensor
    values: torch.Tensor
    flat: torch.Tensor
    q: int


class ComputedRows(NamedTuple):
    """Head patches of layer j - 1 whose one changed position is computed aside and written into block j's input:
    each row a copy of its base row with one head's z set to ``clean`` [n, d_head]. Flat indices for
    ``index_select`` / ``index_copy_``: ``base_flat`` [n] (the base row and position) into the base rows'
    [n_base * q, *], ``head_flat`` [n] into the rows' z viewed [n * heads, d_head], ``out_flat`` [n] (the row and
    position) into block j's input viewed [batch * q, d_model]. Where the group keeps its block tails
    (helpers.patching.block_tails), ``tails_flat`` [n] says where the rows' are, and the rest is not read."""

    clean: torch.Tensor
    base_flat: torch.Tensor
    head_flat: torch.Tensor
    out_flat: torch.Tensor
    tails_flat: torch.Tensor | None = None  # [n] the rows' places in the group's block tails (``RowPlan.tails``)


class RowPlan:
    """What the hooks do in one forward: rows joining per layer and the patch of each layer.

    Rows ``0 .. n_base - 1`` are the unpatched corrupt runs of the forward's examples (one example unless several
    are merged); every other row is a copy of its example's one, joined at its layer. ``row_example`` [batch]:
    each row's example (= the batch index of its base row), in batch order.
    """

    def __init__(self, n_new: list[int], patches: dict, computed: dict | None = None, *, n_base: int = 1,
                 row_example: torch.Tensor | None = None, mask: torch.Tensor | None = None, q: int | None = None,
                 tails=None):
        self.n_new = n_new  # rows appended at the input of block l
        self.n_base = n_base
        self.batch = (n_base + torch.tensor(n_new).cumsum(0)).tolist()  # batch of block l once its rows have joined
        self.patches = patches  # layer -> Patch
        # join layer j -> ComputedRows: head patches of layer j - 1 whose one changed position is computed from
        # their base row's layer j - 1 and written into block j's input
        self.computed = computed or {}
        self.q = q  # the tokens each row is fed (the flat indices assume it)
        if self.computed and q is None:
            raise ValueError("computed rows need q, the tokens each row is fed (their flat indices assume it)")
        self.stash: dict = {}  # ("x" | "z", layer) -> the base rows' block input / out_proj input
        # the group's block tails (helpers.patching.block_tails.BlockTails): filled by its first forward, then read
        self.tails = tails
        self.row_example = row_example
        self.mask = mask  # the batch-n_base 4D mask handed to the model (several examples), gathered per block
        self._gathered: dict = {}

    def fills(self, layer: int) -> bool:
        """Does block ``layer``'s pre-hook fill the group's block tails of layer ``layer - 1`` (its first forward)?"""
        return self.tails is not None and not self.tails.filled and layer >= 1

    def stashes(self, layer: int) -> bool:
        """Does this forward keep its base rows' block input and out_proj input of ``layer`` (for the next block's
        computed rows, or to fill the group's block tails)?"""
        if self.tails is not None:
            return not self.tails.filled and layer < len(self.n_new) - 1
        return layer + 1 in self.computed

    def joining(self, layer: int) -> torch.Tensor | int:
        """Where the rows joining at ``layer`` copy from: base row indices [n], or n copies of row 0."""
        n = self.n_new[layer]
        if self.n_base == 1:
            return n
        return self.row_example[self.batch[layer] - n: self.batch[layer]]

    def per_row(self, args: tuple, kwargs: dict, layer: int) -> tuple[tuple, dict]:
        """A block's batch-``n_base`` arguments (the 4D mask, rotary tables, position ids) gathered to its rows."""
        b = self.batch[layer]
        index = self.row_example[:b]

        if self._gathered.get("batch") != b:  # blocks run in order: keep only the current batch's copies
            self._gathered = {"batch": b}

        def rows(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in self._gathered:
                self._gathered[id(t)] = t.index_select(0, index)
            return self._gathered[id(t)]

        if self.mask is not None and not (any(a is self.mask for a in args)
                                          or any(v is self.mask for v in kwargs.values())):
            raise MaskNotPassedOn(f"block {layer} did not receive the sweep's 4D attention mask as given")
        mask = self.mask if self.mask is not None and self.mask.shape[0] == self.n_base else None
        args = tuple(rows(a) if mask is not None and a is mask else a for a in args)
        kwargs = dict(kwargs)
        for key, value in kwargs.items():
            if mask is not None and value is mask:
                kwargs[key] = rows(value)
            elif key == "position_embeddings" and isinstance(value, tuple) and value[0].shape[0] == self.n_base:
                kwargs[key] = tuple(rows(t) for t in value)
            elif key == "position_ids" and isinstance(value, torch.Tensor) and value.dim() == 2 \
                    and value.shape[0] == self.n_base > 1:
                kwargs[key] = rows(value)
        return args, kwargs
