"""Head patches' block tails computed once a group: a head patch of layer l < L-1 changes block l's output at its
position only, and the row joins block l + 1 with that one vector (``hooks.block_tail``). The group's first forward
(its widest bucket: every example's last ``q`` tokens, every position any row patches) computes it for *every* row
of the group, layer by layer from its unpatched rows; the later forwards look their rows' up. One ``block_tail``
a layer a group (in slices of one token a row, as many as the forward's row-tokens) instead of one a layer a
forward: each is ~8 launches (output projection, addition, norm, MLP, gathers), and small models' sweeps wait on
the host that launches them."""
from __future__ import annotations

from typing import Sequence

import torch

from helpers.patching.chunking import free_bytes
from helpers.patching.grouping import bucket_rows
from helpers.patching.model_calls import to_device

# the table's bytes at most: a share of the device memory free (CUDA), or this much (CPU); beyond, each forward
# computes its own rows' tails as before
FREE_MEMORY_SHARE = 0.1
CPU_BYTES = 512 * 2**20
ENABLED = True  # (benchmarks and tests compare with the per-forward tails)


def tails_fit(n_bytes: int, device: torch.device) -> bool:
    """Does a table of ``n_bytes`` fit the budget (``FREE_MEMORY_SHARE`` of free CUDA memory, ``CPU_BYTES``)?"""
    if device.type != "cuda":
        return n_bytes <= CPU_BYTES
    return n_bytes <= FREE_MEMORY_SHARE * free_bytes(device)


def for_group(acts: torch.Tensor, spans: Sequence[int], T: int, q: int, d_model: int) -> "BlockTails | None":
    """A group's table (``BlockTails(acts, spans, T, q)``) where it applies (``ENABLED``, more than one layer) and its
    (L-1) x heads x sum(spans) x ``d_model`` values fit the budget (``tails_fit``; they take ``acts``' dtype, the
    model's); else None, and each forward computes its own rows' tails."""
    _, L, _, U, _ = acts.shape
    if not ENABLED or L < 2:
        return None
    n_bytes = (L - 1) * U * sum(int(s) for s in spans) * d_model * acts.element_size()
    return BlockTails(acts, spans, T, q) if tails_fit(n_bytes, acts.device) else None


class BlockTails:
    """The group's table ``values`` [L - 1, n, d_model]: row (example e, unit u, r) of layer l at
    ``l * n + offset[e] + u * span[e] + r - 1`` (``n``: the rows of one layer, U x span of each example).

    ``fill(layer, x0, z0, compute)``, in the first forward (``filled`` false; fed ``q`` tokens, ``n_base`` unpatched
    rows first): layer's tails from that forward's unpatched rows' block input ``x0`` [n_base, q, d_model] and output
    projection input ``z0`` [n_base, q, U * w], ``fill_rows`` rows at a time (set to the forward's row-tokens, so
    an out-of-memory halving of the forward halves these slices too); ``compute(layer, x0, z0, base_flat, head_flat,
    clean)`` is ``hooks.tail_values``. ``flat(layer, example, unit, r)`` [m] (host): the rows' places in ``values``."""

    def __init__(self, acts: torch.Tensor, spans: Sequence[int], T: int, q: int):
        E, L, T_acts, U, w = acts.shape
        self.acts, self.L, self.q = acts, L, q
        self.spans = torch.tensor([int(s) for s in spans])
        per_example = self.spans * U
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_example.cumsum(0)[:-1]])
        self.n = int(per_example.sum())
        self.filled, self._layers_filled = False, set()
        self.fill_rows = self.n
        self.values: torch.Tensor | None = None  # (allocated at the first fill: the block output's width and dtype)
        # every row of one layer in table order (example, unit, r): one bucket's rows where it covers every span;
        # and where the fill reads each (host, then one copy)
        widest = max(1, int(self.spans.max()))
        example, unit, r = bucket_rows(1, U, spans, widest, widest)[:, 1:].unbind(1)
        layer = torch.arange(L - 1).unsqueeze(1)
        act_flat = ((example * L + layer) * T_acts + (T - r)) * U + unit  # [L - 1, n] into acts [E, L, T, U, w]
        host = torch.cat([(example * q + q - r), torch.arange(self.n) * U + unit, act_flat.reshape(-1)])
        dev = to_device(host, acts.device)
        self.base_flat, self.head_flat = dev[:self.n], dev[self.n:2 * self.n]
        self.act_flat = dev[2 * self.n:].view(L - 1, self.n)

    def flat(self, layer: torch.Tensor, example: torch.Tensor, unit: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The rows' places in ``values`` viewed [(L - 1) * n, d_model] (host; a last-layer row's is unread)."""
        return layer.clamp(max=self.L - 2) * self.n + self.offsets[example] + unit * self.spans[example] + r - 1

    def fill(self, layer: int, x0: torch.Tensor, z0: torch.Tensor, compute) -> None:
        """Layer ``layer``'s tails from the first forward's unpatched rows (see the class)."""
        if x0.shape[1] != self.q:
            raise RuntimeError(f"block tails: the filling forward fed {x0.shape[1]} tokens, the table {self.q}")
        acts = self.acts.reshape(-1, self.acts.shape[-1])
        U = self.acts.shape[3]
        step = max(1, self.fill_rows)
        for a in range(0, self.n, step):
            b = min(self.n, a + step)
            # (each row's head among its slice's z viewed [rows * U, w]: the table's numbering, from the slice's start)
            head_flat = self.head_flat[a:b] if a == 0 else self.head_flat[a:b] - a * U
            out = compute(layer, x0, z0, self.base_flat[a:b], head_flat,
                          acts.index_select(0, self.act_flat[layer, a:b]))  # [b - a, d_model]
            if self.values is None:
                self.values = out.new_empty(self.L - 1, self.n, out.shape[-1])
            self.values[layer, a:b] = out
        self._layers_filled.add(layer)

    def complete(self) -> None:
        """The first forward has finished: every layer's tails must be there (``filled`` from now on)."""
        if len(self._layers_filled) != self.L - 1:
            raise RuntimeError(f"block tails: {len(self._layers_filled)} of {self.L - 1} layers filled")
        self.filled = True

    def lookup(self, tails_flat: torch.Tensor) -> torch.Tensor:
        """The tails at ``tails_flat`` (``flat``, on the device): [m, d_model]."""
        return self.values.view(-1, self.values.shape[-1]).index_select(0, tails_flat)
