"""Prompts of different lengths as one batch, aligned at their *ends* (left padding), with the masks to match.

A patching sweep merges several examples into one forward. Aligning them at the end puts every example's answer
position last, so "the last q tokens" is the same slice for every example, the last layer's answer-only shortcut
holds for all, and each example's positions before the fed tokens form a left-padded prefix. Pad slots hold a
copy of the example's first token; no real query ever sees them as keys (``additive_mask``), and a pad query sees
itself only, so its softmax never has an empty row (an empty row gives NaN, and NaN keys would poison real rows).
"""
from __future__ import annotations

from typing import Sequence

import torch


class AlignedBatch:
    """``ids``, ``positions`` (each example's own position ids; 0 on pads), ``valid`` (False on pads): [batch, T]."""

    def __init__(self, token_lists: Sequence[Sequence[int]], device):
        lengths = [len(t) for t in token_lists]
        if not lengths or min(lengths) == 0:
            raise ValueError("an aligned batch needs at least one non-empty token list")
        self.length = max(lengths)
        self.pads = [self.length - n for n in lengths]
        rows = [[t[0]] * p + list(t) for t, p in zip(token_lists, self.pads)]
        self.ids = torch.tensor(rows, dtype=torch.long, device=device)
        pad = torch.tensor(self.pads, device=device).unsqueeze(1)  # [batch, 1]
        index = torch.arange(self.length, device=device).unsqueeze(0)  # [1, T]
        self.positions = (index - pad).clamp(min=0)
        self.valid = index >= pad

    @property
    def padded(self) -> bool:
        return any(self.pads)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def additive_mask(self, q: int, kv: int, dtype: torch.dtype) -> torch.Tensor:
        """Eager's additive mask [batch, 1, q, kv] for queries at aligned slots kv-q .. kv-1 over keys 0 .. kv-1:
        causal, pads hidden from real queries; a pad query attends to itself alone."""
        device = self.ids.device
        q_slot = torch.arange(kv - q, kv, device=device).unsqueeze(1)  # [q, 1]
        k_slot = torch.arange(kv, device=device).unsqueeze(0)  # [1, kv]
        allowed = (k_slot <= q_slot) & (self.valid[:, None, :kv] | (k_slot == q_slot))  # [batch, q, kv]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
