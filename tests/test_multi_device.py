"""One experiment's head sweep split across devices (helpers.patching.multi_device): on the CPU, two worker
processes beside this one, the merged result bit for bit the one-device result."""
from __future__ import annotations

import pytest
import torch

from helpers.experiments.experiment import parse_devices, run_experiment
from helpers.experiments.result_json import experiment_to_dict
from helpers.patching.multi_device import merge_in_order, split_in_order
from test_notebooks import model_settings


def test_shares_are_contiguous_and_in_order():
    assert split_in_order(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_in_order(2, 4) == [range(0, 1), range(1, 2)]  # fewer examples than devices: no empty share
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"] and parse_devices(None) == [] and parse_devices("") == []
    with pytest.raises(ValueError):
        parse_devices(",")


def test_an_experiment_split_across_three_devices_is_the_one_device_result():
    settings = {**model_settings(), "batch_size": 5, "circuit": False}
    one = run_experiment(feature_name="ENGFIELDNAME", progress=False, generate=False, **settings)
    split = run_experiment(feature_name="ENGFIELDNAME", progress=False, generate=False,
                           devices=["cpu", "cpu", "cpu"], **settings)
    a, b = one.patching, split.patching
    assert b.stats["shares"] == [2, 2, 1] and b.stats["devices"] == ["cpu", "cpu", "cpu"]
    assert len(set(b.stats["pids"])) == 3  # this process and two workers
    assert torch.equal(a.patched_logit_diff.nan_to_num(123.0), b.patched_logit_diff.nan_to_num(123.0))
    assert torch.equal(a.patched_logit_diff.isnan(), b.patched_logit_diff.isnan())
    for name in ("clean_logit_diff", "corrupt_logit_diff", "clean_correct", "included", "lengths",
                 "first_difference"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.normalised.nan_to_num(123.0), b.normalised.nan_to_num(123.0))
    assert experiment_to_dict(split)["metadata"]["sweep_devices"] == ["cpu", "cpu", "cpu"]
    assert experiment_to_dict(one)["metadata"]["sweep_devices"] is None


def test_merge_pads_shorter_shares_with_nan():
    from helpers.patching.result_types import HeadPatchingResult

    def part(n, T):
        return HeadPatchingResult(kind="heads", dims=("example", "layer", "head", "pos"),
                                  patched_logit_diff=torch.zeros(n, 1, 1, T), clean_logit_diff=torch.ones(n),
                                  corrupt_logit_diff=torch.zeros(n), clean_correct=torch.ones(n, dtype=torch.bool),
                                  included=torch.ones(n, dtype=torch.bool), lengths=torch.full((n,), T),
                                  first_difference=torch.zeros(n, dtype=torch.long))
    merged = merge_in_order([part(2, 4), part(1, 6)])
    assert merged.patched_logit_diff.shape == (3, 1, 1, 6)
    assert merged.patched_logit_diff[:2, ..., 4:].isnan().all() and merged.lengths.tolist() == [4, 4, 6]
