"""SkippedLayers: one representation of a plan's skipped layers, with the plan's JSON and printed form."""

import dataclasses

import pytest
import torch

from vlmprune import Plan, VlmpruneError
from vlmprune.engine import SkippedLayers
from vlmprune.engine.runner import LayerSamples


@pytest.mark.parametrize(
    "skip, sets, per_sample, json_form",
    [
        ((), (frozenset(),), False, []),
        ([6, 2, 6], (frozenset({2, 6}),), False, [2, 6]),
        (torch.tensor([3, 1]), (frozenset({1, 3}),), False, [1, 3]),
        ([[6], [1, 6]], (frozenset({6}), frozenset({1, 6})), True, [[6], [1, 6]]),
        ((frozenset({4}), [], torch.tensor([5, 0])), (frozenset({4}), frozenset(), frozenset({0, 5})), True, [[4], [], [0, 5]]),
    ],
)
def test_parse_normalises_every_accepted_form(skip, sets, per_sample, json_form):
    parsed = SkippedLayers.parse(skip)
    assert parsed == SkippedLayers(sets, per_sample) and parsed.to_json() == json_form
    plan = Plan(skip=skip)
    assert plan.skip == parsed and plan.to_dict()["skip"] == json_form
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).skip == parsed
    assert repr(plan) == f"Plan(no token stages; skip={json_form})"


def test_shared_and_per_sample_answers():
    shared, rows = SkippedLayers.parse([2, 5]), SkippedLayers.parse([[2], [], [1, 5]])
    assert shared.batch_size is None and shared.for_batch(3) == (frozenset({2, 5}),) * 3
    assert rows.batch_size == 3 and rows.for_batch(3) == (frozenset({2}), frozenset(), frozenset({1, 5}))
    assert shared.layers == frozenset({2, 5}) and rows.layers == frozenset({1, 2, 5})
    assert shared and rows and not SkippedLayers.parse([]) and not SkippedLayers.parse([[], []])
    assert Plan(skip=[[], []]).is_empty and Plan(skip=[[], []]).batch_size == 2 and Plan(skip=[3]).batch_size is None


def test_printed_form_and_json_are_unchanged():
    plan = Plan(keep={2: torch.tensor([[0, 4]])}, skip=[5, 3])
    assert repr(plan) == "Plan(K=2: keep 2; skip=[3, 5])"
    assert plan.to_json() == '{"keep": {"2": [[0, 4]]}, "skip": [3, 5]}'
    rows = Plan(keep={2: torch.tensor([[0, 4], [1, 2]])}, skip=[[5], [3]])
    assert repr(rows) == "Plan(K=2: keep 2/2; skip=[[5], [3]])"
    assert rows.to_json() == '{"keep": {"2": [[0, 4], [1, 2]]}, "skip": [[5], [3]]}'
    assert dataclasses.replace(rows, overhead=1.0).skip == rows.skip  # re-validating keeps the representation


@pytest.mark.parametrize(
    "skip, message",
    [([-1], "negative layer index"), ([[1], [-3]], "negative layer index")],
)
def test_bad_skips_are_refused(skip, message):
    with pytest.raises(VlmpruneError, match=message):
        Plan(skip=skip)
    with pytest.raises(VlmpruneError, match="per-sample lists but keep has batch 1"):
        Plan(keep={1: torch.tensor([[0]])}, skip=[[1], [2]])


def test_layer_samples_say_who_runs_a_layer():
    assert LayerSamples().runs and LayerSamples(torch.tensor([0, 2])).runs
    assert not LayerSamples(torch.zeros(0, dtype=torch.long)).runs
