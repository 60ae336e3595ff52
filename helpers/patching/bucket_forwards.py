"""One group of examples' sweep: its buckets' forwards, each row one patch, and the metric of every row."""
from __future__ import annotations

import torch

from helpers.models.architectures import head_geometry
from helpers.patching import block_tails
from helpers.patching.aligned_batch import AlignedBatch
from helpers.patching.caches import expanded, group_activations_and_prefix_caches, is_plain
from helpers.patching.chunking import auto_chunk_rows, run_chunked
from helpers.patching.fused_modules import per_example_prefix_applies
from helpers.patching.grouping import SweepExample, bucket_count, bucket_rows, bucket_sizes
from helpers.patching.hooks import ANSWER_ONLY_LAST_LAYER, sweep_hooks
from helpers.patching.model_calls import (ModelCalls, model_device, model_dtype, padded, to_device,
                                         two_row_output_layer)
from helpers.patching.plan import ComputedRows, Patch, RowPlan
from helpers.patching.sites import Site


def row_metric(logits: torch.Tensor, two_rows: bool, clean_tok: torch.Tensor, corrupt_tok: torch.Tensor,
            row_example: torch.Tensor) -> torch.Tensor:
    """logit[clean] - logit[corrupt] of every row [batch], each with its example's tokens. ``two_rows``: the logits
    have two columns per example (clean, corrupt), else the full vocabulary (``*_tok``: [examples] token ids)."""
    logits = logits.float()
    if two_rows:
        clean_col, corrupt_col = 2 * row_example, 2 * row_example + 1
    else:
        clean_col, corrupt_col = clean_tok[row_example], corrupt_tok[row_example]
    return (logits.gather(1, clean_col.unsqueeze(1)) - logits.gather(1, corrupt_col.unsqueeze(1))).squeeze(1)


def sweep_group(model, calls: ModelCalls, site: Site, group: list[SweepExample], *, chunk_size, bucket_size, stats,
                 bar=None, swap=None, kept=()) -> list[torch.Tensor]:
    """patched_logit_diff [L, U, T] of each example of ``group`` (prefix positions = corrupt, the rest computed).

    The examples run end-aligned in the same forwards (helpers.patching.aligned_batch): rows 0 .. E-1 are their unpatched
    corrupt runs, every patch row a copy of its example's. Fused attention reads the corrupt prefix itself where it
    can (helpers.patching.triton_kernels' ``row_attention``; one example's rows over 128 tokens: flash); elsewhere every
    row gets its example's prefix as a cache, and several examples a padding mask. Raises NotMergeable (before any
    result) where several examples cannot share forwards. ``kept``: the unpatched runs' kept forwards
    (helpers.patching.example_runs.unpatched_runs), the group's clean activations and prefix caches where one holds it.
    """
    device = model_device(model)
    L, U, E = len(site.modules), site.n_units, len(group)
    spans = [ex.span for ex in group]
    size, qs = bucket_sizes(max(spans), bucket_size, bucket_count(model, site, spans))
    if not qs:
        return placed_results(group, [], L, U, stats)
    corrupt = AlignedBatch([ex.pair.corrupt_ids for ex in group], device)
    T = corrupt.length
    clean_toks = torch.tensor([ex.pair.clean_token_id for ex in group], device=device)
    corrupt_toks = torch.tensor([ex.pair.corrupt_token_id for ex in group], device=device)
    tokens = [t for ex in group for t in (ex.pair.clean_token_id, ex.pair.corrupt_token_id)]
    state: dict = {"plan": None}
    results: list = []
    with torch.inference_mode(), two_row_output_layer(model, tokens) as two_rows, sweep_hooks(model, site, state):
        # acts: [E, L, T, U, w]; snaps: the corrupt prefix cache of each bucket (one forward for both, or none:
        # the unpatched runs' forward, kept)
        acts, snaps = group_activations_and_prefix_caches(model, calls, site, [ex.pair for ex in group],
                                                          [ex.index for ex in group], corrupt, [T - q for q in qs],
                                                          stats, swap, kept)
        # fused attention reads the corrupt prefix itself (no per-row cache copies; several examples: each row its
        # own example's, through Triton's row_attention)
        shares_prefix = (swap is not None and swap.shares_prefix and all(is_plain(c) for c in snaps if c is not None)
                         and (E == 1 or (per_example_prefix_applies(next(model.parameters()), max(spans),
                                                                head_geometry(model.config).d_head)
                                             and swap.per_example_prefixes_fit(T))))
        starts = torch.tensor(corrupt.pads, device=device) if shares_prefix and E > 1 else None
        stats["shared_prefix"] = shares_prefix
        # A head patch of layer l < L-1 changes block l's output at its position only: that one vector is computed
        # aside (block_tail) and the row joins at block l + 1, skipping layer l's full width. The group's first
        # forward computes every row's (helpers.patching.block_tails), where the table fits; else each forward its own.
        joins_late = site.kind == "heads"
        d_model = head_geometry(model.config).d_model
        tails = block_tails.for_group(acts, spans, T, qs[0], d_model) if joins_late else None
        stats["max_examples_per_forward"] = max(stats.get("max_examples_per_forward", 0), E)
        for q, snap in zip(qs, snaps):
            s = T - q
            grid = bucket_rows(L, U, spans, q, size)  # (layer, example, unit, r)
            n_rows = grid.shape[0]
            # (every forward also carries the E base rows)
            rows_size = chunk_size or min(n_rows, max(1, auto_chunk_rows(model, q, T, device) - E))
            ids, positions = corrupt.ids[:, s:], corrupt.positions[:, s:]
            mask = corrupt.additive_mask(q, T, model_dtype(model)) if E > 1 and not shares_prefix else None

            def run(a: int, b: int):
                rows = grid[a:b]  # host: (layer, example, unit, r), layer-major
                m = b - a
                by_layer = torch.bincount(rows[:, 0], minlength=L).tolist()
                layer_of, example, unit, r = rows.unbind(1)
                # Rows join layer-major after the E base rows, so row i of the grid is batch row E + i. Every index
                # the hooks need is computed here on the host and sent in one transfer: per-layer index arithmetic
                # on the device was a dozen small launches a layer.
                rel = q - r
                batch_idx = E + torch.arange(m)
                start_of = torch.tensor([0] + by_layer).cumsum(0)[layer_of]  # each row's layer's first row
                host = torch.cat([
                    batch_idx, rel, unit,
                    (((example * L + layer_of) * acts.shape[2] + (T - r)) * U + unit),  # into acts [E, L, T, U, w]
                    (batch_idx * q + rel) * U + unit,  # into a site's [batch, q, U, w] as rows
                    example * q + rel,  # into the base rows' [E, q, *] as rows
                    (torch.arange(m) - start_of) * U + unit,  # into one layer's rows' z [n, U, w] as rows
                    batch_idx * q + rel,  # into a block input's [batch, q, d] as rows
                    torch.arange(E), example,  # each row's example, in batch order (base rows first)
                    *([tails.flat(layer_of, example, unit, r)] if tails is not None else [])])
                dev = to_device(host, device)
                (batch_dev, rel_dev, unit_dev, act_flat, patch_flat, base_flat, head_flat,
                 out_flat) = dev[:8 * m].view(8, m)
                row_example = dev[8 * m:8 * m + E + m]
                tails_flat = dev[9 * m + E:] if tails is not None else None
                clean_all = acts.reshape(-1, acts.shape[-1]).index_select(0, act_flat)  # [m, w]: one gather
                n_new = [0] * L
                patches, computed, start = {}, {}, 0
                for layer in range(L):
                    n = by_layer[layer]
                    if not n:
                        continue
                    join = layer + 1 if joins_late and layer < L - 1 else layer
                    seg = slice(start, start + n)
                    if join == layer:
                        patches[layer] = Patch(batch_dev[seg], rel_dev[seg], unit_dev[seg], clean_all[seg],
                                               patch_flat[seg], q)
                    else:
                        computed[join] = ComputedRows(clean_all[seg], base_flat[seg], head_flat[seg], out_flat[seg],
                                                      None if tails_flat is None else tails_flat[seg])
                    n_new[join] += n
                    start += n
                state["plan"] = plan = RowPlan(n_new, patches, computed, n_base=E, row_example=row_example, mask=mask,
                                               q=q, tails=tails)
                if tails is not None:  # (the fill's rows of one token a slice: as many as this forward's row-tokens,
                    tails.fill_rows = m * q  # so an out-of-memory halving of the forward halves them too)
                per_layer_batch = plan.batch
                if swap is not None and swap.blocks:  # fused blocks make room for the next block's rows
                    swap.extra_rows = {j - 1: plan.joining(j) for j, n in enumerate(n_new)
                                       if j > 0 and n and j - 1 in swap.blocks}
                try:
                    if shares_prefix:  # every row's fed tokens are real: a causal mask, broadcast over rows
                        with swap.shared_prefix(snap, row_example if E > 1 else None, starts):
                            logits, _ = calls.forward(model, ids, positions=positions, ready_mask=True)
                    else:
                        with padded(swap, corrupt.padded):
                            logits, _ = calls.forward(model, ids, positions=positions, mask=mask,
                                                      cache=expanded(snap, per_layer_batch, row_example))
                finally:
                    state["plan"] = None
                    if swap is not None:
                        swap.extra_rows = None
                if tails is not None and not tails.filled:
                    tails.complete()
                    stats["block_tail_fills"] = stats.get("block_tail_fills", 0) + 1
                # stays on the device until the group is done: no host sync between forwards
                results.append((rows, row_metric(logits, two_rows, clean_toks, corrupt_toks, row_example)))
                stats["forwards"] = stats.get("forwards", 0) + 1
                # token-layers through full blocks (the last layer counts one token a row: only its answer
                # position goes through the output projection and MLP)
                stats["row_token_layers"] = stats.get("row_token_layers", 0) + (
                    q * sum(per_layer_batch[:-1])
                    + per_layer_batch[-1] * (1 if site.kind in ANSWER_ONLY_LAST_LAYER else q))
                stats["rows"] = stats.get("rows", 0) + (b - a)
                stats["max_rows_per_forward"] = max(stats.get("max_rows_per_forward", 0), b - a)
                if bar is not None:
                    bar.update(b - a)

            _, halvings = run_chunked(n_rows, rows_size, run)
            stats["oom_halvings"] = stats.get("oom_halvings", 0) + halvings
    return placed_results(group, results, L, U, stats)


def placed_results(group: list[SweepExample], results: list, L: int, U: int, stats: dict) -> list[torch.Tensor]:
    """Each example's patched_logit_diff [L, U, length] from a group's forwards' ``results`` [(rows (layer,
    example, unit, r) [m, 4] on the host, metrics [E + m] on the device, the E unpatched rows first)]; positions no
    row patched hold the example's corrupt metric. One transfer and one scatter for the whole group (a transfer and a
    few host operations per forward and example took ~15 ms of a ten-example sweep's tail on a CPU, the GPU idle).
    Records the self-check ``base_row_max_dev``: how far the unpatched rows of each forward, for the examples it
    patches, are from their examples' corrupt metrics."""
    E = len(group)
    corrupt_diffs = torch.tensor([float(ex.corrupt_diff) for ex in group], dtype=torch.float64)
    lengths = torch.tensor([ex.length for ex in group])
    out = corrupt_diffs.float().view(E, 1, 1, 1).expand(E, L, U, int(lengths.max())).clone()
    if results:
        counts = [rows.shape[0] for rows, _ in results]
        diffs = torch.cat([d for _, d in results]).cpu().split([E + n for n in counts])
        base = torch.stack([d[:E] for d in diffs]).double()  # [forwards, E]
        patched = torch.cat([d[E:] for d in diffs])  # [rows]
        rows = torch.cat([r for r, _ in results])  # in patched's order
        present = torch.zeros(len(results), E, dtype=torch.bool)  # forward k patches rows of example e
        present[torch.arange(len(results)).repeat_interleave(torch.tensor(counts)), rows[:, 1]] = True
        dev = (base - corrupt_diffs).abs()[present]
        dev = dev[~dev.isnan()]  # (a NaN metric hides no other deviation, as Python's max skipped it before)
        if dev.numel():
            stats["base_row_max_dev"] = max(stats.get("base_row_max_dev", 0.0), float(dev.max()))
        example = rows[:, 1]
        out[example, rows[:, 0], rows[:, 2], lengths[example] - rows[:, 3]] = patched
    return [out[e, :, :, :ex.length] for e, ex in enumerate(group)]
