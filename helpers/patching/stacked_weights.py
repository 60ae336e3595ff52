"""Several Linear layers that read the same input as one matmul: their weights (and biases) stacked."""
from __future__ import annotations

from typing import Sequence

import torch


def stacked_linears(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' weights stacked along their outputs, and their biases where any has one (zeros for the others);
    detached copies, held by the caller while its swap lasts: ``F.linear(x, w, b)`` is every layer's output at once."""
    weight = torch.cat([m.weight.detach() for m in linears])
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in linears])
