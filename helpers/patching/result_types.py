"""Results of a patching sweep, and the bookkeeping every kernel shares (metric, guard, inclusion).

Metric: ``logit_diff = logits[answer_position, clean_token_id] - logits[answer_position, corrupt_token_id]``.
Normalised score: ``(patched - corrupt) / (clean - corrupt)``: 0 = no effect, 1 = the patch restores the clean
answer fully.

Positions are *per example* token indices. Examples of different lengths are padded to the longest one with
NaN, and ``mean()`` / ``std()`` are NaN-aware (``torch.nanmean``): a cell averages only over the included
examples that have that position. Position ``i`` is token ``i`` of every example; aligning examples by role
(e.g. "the table name") rather than by index is the caller's job.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: Default guard on |clean - corrupt|. bf16 resolves a logit of size ~10 only to ~0.06, so a denominator below
#: 0.1 is noise there, and normalised scores would be blown up by it.
DEFAULT_MIN_DENOMINATOR = 0.1


@dataclass
class PatchingResult:
    """One sweep over examples. ``dims`` names the axes of ``patched_logit_diff`` / ``normalised``.

    ``patched_logit_diff`` is NaN past each example's length and for examples not included (clean-incorrect
    examples are not even run unless ``keep_incorrect``). ``normalised`` is additionally NaN for examples
    whose |clean - corrupt| is below ``min_denominator`` (a warning names them); it is never ±inf.
    """

    kind: str
    dims: tuple[str, ...]
    patched_logit_diff: torch.Tensor  # [example, layer, (head,) pos], float32, CPU
    clean_logit_diff: torch.Tensor  # [example]
    corrupt_logit_diff: torch.Tensor  # [example]
    clean_correct: torch.Tensor  # [example] bool: clean argmax at answer_position == clean_token_id
    included: torch.Tensor  # [example] bool: examples whose sweep was computed and enters mean()/std()
    lengths: torch.Tensor  # [example] long: number of positions of each example
    first_difference: torch.Tensor  # [example] long: first index where clean and corrupt ids differ
    min_denominator: float = DEFAULT_MIN_DENOMINATOR
    normalised: torch.Tensor = field(init=False)
    guarded: torch.Tensor = field(init=False)  # [example] bool: |clean - corrupt| < min_denominator
    stats: dict = field(default_factory=dict)  # how the sweep was computed (forwards, chunk size, ...)

    def __post_init__(self):
        denom = self.clean_logit_diff - self.corrupt_logit_diff
        self.guarded = ~(denom.abs() >= self.min_denominator)  # NaN denominators are guarded too
        shape = (-1,) + (1,) * (self.patched_logit_diff.dim() - 1)
        safe = torch.where(self.guarded, torch.ones_like(denom), denom).view(shape)
        norm = (self.patched_logit_diff - self.corrupt_logit_diff.view(shape)) / safe
        norm[self.guarded] = float("nan")
        norm[~self.included] = float("nan")
        self.normalised = norm

    @property
    def n_examples(self) -> int:
        return int(self.clean_logit_diff.shape[0])

    @property
    def n_included(self) -> int:
        return int(self.included.sum())

    def _stack(self, normalised: bool) -> torch.Tensor:
        values = self.normalised if normalised else self.patched_logit_diff
        return values[self.included]

    def count(self, normalised: bool = True) -> torch.Tensor:
        """Number of included examples with a finite value per cell (positions differ across examples)."""
        return torch.isfinite(self._stack(normalised)).sum(0)

    def mean(self, normalised: bool = True) -> torch.Tensor:
        """NaN-aware mean over included examples -> [layer, (head,) pos]; NaN where no example has a value."""
        values = self._stack(normalised)
        if values.shape[0] == 0:
            return torch.full(values.shape[1:], float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.nanmean(values, dim=0)

    def std(self, normalised: bool = True) -> torch.Tensor:
        """NaN-aware sample standard deviation (n-1) over included examples; NaN where fewer than 2 values."""
        values = self._stack(normalised)
        n = torch.isfinite(values).sum(0)
        if values.shape[0] == 0:
            return torch.full(values.shape[1:], float("nan"))
        mean = self.mean(normalised)
        sq = torch.nansum((values - mean) ** 2, dim=0)
        out = torch.sqrt(sq / (n - 1).clamp(min=1))
        out[n < 2] = float("nan")
        return out


@dataclass
class HeadPatchingResult(PatchingResult):
    """``patched_logit_diff`` / ``normalised``: [example, layer, head, pos]."""


@dataclass
class LayerPatchingResult(PatchingResult):
    """``patched_logit_diff`` / ``normalised``: [example, layer, pos] (residual, attention or MLP output)."""


@dataclass
class TokenPair:
    """The minimal pair the kernels read (helpers.tinysql.pairs.CleanCorruptPair has these fields and more)."""

    clean_ids: list  # [pos]
    corrupt_ids: list  # [pos], equal length, differs from clean_ids at corrupted_position only
    corrupted_position: int
    answer_position: int  # whose logits predict the answer token
    clean_token_id: int
    corrupt_token_id: int


def validate_pair(pair, index: int) -> int:
    """Check a pair's invariants; return the first index where clean and corrupt ids differ (len if none)."""
    clean, corrupt = list(pair.clean_ids), list(pair.corrupt_ids)
    if len(clean) != len(corrupt):
        raise ValueError(f"example {index}: clean and corrupt ids differ in length ({len(clean)} != {len(corrupt)})")
    if pair.answer_position != len(clean) - 1:
        raise ValueError(
            f"example {index}: answer_position={pair.answer_position} but the ids have length {len(clean)}; "
            "the ids must be truncated so that the last position predicts the answer"
        )
    diffs = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    if diffs and diffs != [pair.corrupted_position]:
        warnings.warn(
            f"example {index}: corrupted_position={pair.corrupted_position} but the ids differ at {diffs}; "
            f"the sweep skips only positions before {diffs[0]}",
            stacklevel=3,
        )
    return diffs[0] if diffs else len(clean)


def report_inclusion(clean_correct: Sequence[bool], keep_incorrect: bool) -> torch.Tensor:
    """The ``included`` mask; warns naming the clean-incorrect examples (excluded unless keep_incorrect)."""
    correct = torch.tensor([bool(c) for c in clean_correct], dtype=torch.bool)
    wrong = (~correct).nonzero().flatten().tolist()
    if wrong:
        what = "kept (keep_incorrect=True)" if keep_incorrect else "excluded from the sweep"
        warnings.warn(
            f"{len(wrong)} of {len(correct)} examples are predicted wrongly on the clean prompt and are {what}: "
            f"examples {wrong}",
            stacklevel=3,
        )
    return torch.ones_like(correct) if keep_incorrect else correct


def warn_small_denominators(clean: torch.Tensor, corrupt: torch.Tensor, included: torch.Tensor,
                            min_denominator: float, stacklevel: int = 3) -> None:
    """One warning per included example whose |clean - corrupt| logit difference is below ``min_denominator`` (or
    NaN): its normalised scores are NaN, so means over examples leave it out. Every result that normalises says so
    (the head sweep's, the circuits' cell sets and edges)."""
    denom = clean - corrupt  # (in the caller's dtype: the same test as its scores')
    for i in (included & ~(denom.abs() >= min_denominator)).nonzero().flatten().tolist():
        warnings.warn(
            f"example {i}: |clean - corrupt| logit difference = {abs(float(denom[i])):.3g} < min_denominator="
            f"{min_denominator}; its normalised scores are NaN (raw patched_logit_diff is kept)",
            stacklevel=stacklevel,
        )


def warn_guarded(result: PatchingResult) -> None:
    warn_small_denominators(result.clean_logit_diff, result.corrupt_logit_diff, result.included,
                            result.min_denominator, stacklevel=4)


def build_result(cls, kind, dims, patched, clean, corrupt, clean_correct, included, lengths, first_diff,
                 min_denominator, stats=None) -> PatchingResult:
    result = cls(
        kind=kind, dims=dims, patched_logit_diff=patched,
        clean_logit_diff=torch.as_tensor(clean, dtype=torch.float32),
        corrupt_logit_diff=torch.as_tensor(corrupt, dtype=torch.float32),
        clean_correct=torch.as_tensor(clean_correct, dtype=torch.bool),
        included=torch.as_tensor(included, dtype=torch.bool),
        lengths=torch.as_tensor(lengths, dtype=torch.long),
        first_difference=torch.as_tensor(first_diff, dtype=torch.long),
        min_denominator=min_denominator, stats=dict(stats or {}),
    )
    warn_guarded(result)
    return result
