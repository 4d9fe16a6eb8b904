"""Plan: validation with clear errors, and a JSON round trip."""

import pytest
import torch

from vlmprune import Plan, VlmpruneError


def test_json_round_trip_and_repr():
    plan = Plan(keep={2: torch.tensor([[3, 1, 2], [0, 4, 5]]), 5: [torch.tensor([1]), torch.tensor([4, 5])]}, skip=[[6], [1, 6]])
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.keep[2][0].tolist() == [1, 2, 3]  # sorted: tokens keep their sequence order
    assert again.skip_sets(2) == (frozenset({6}), frozenset({1, 6}))
    assert "K=2" in repr(plan) and Plan().is_empty and not plan.is_empty


def test_ragged_rows_are_sorted_and_checked_as_each_row_alone():
    """Rows are normalised in groups of one length: each equals its own sorted unique indices, and
    the first bad row of a ragged batch is the one named."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randperm(30, generator=gen)[: int(k)] for k in torch.randint(0, 12, (40,), generator=gen)]
    plan = Plan(keep={1: rows})
    assert [r.tolist() for r in plan.keep[1]] == [torch.unique(r).tolist() for r in rows]
    bad = rows[:5] + [torch.tensor([4, 2, 4])] + rows[5:9] + [torch.tensor([-3, 1])]
    with pytest.raises(VlmpruneError, match="row 5: duplicated"):
        Plan(keep={1: bad})
    with pytest.raises(VlmpruneError, match="row 9: negative index -3"):
        Plan(keep={1: [r for b, r in enumerate(bad) if b != 5]})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep={2: torch.tensor([[1, 1]])}), "duplicated"),
        (dict(keep={2: torch.tensor([[-1, 1]])}), "negative index"),
        (dict(keep={-1: torch.tensor([[1]])}), "integer >= 0"),
        (dict(keep={2: torch.tensor([1, 2])}), "is 1-D"),
        (dict(keep={2: torch.tensor([[0.5]])}), "integer tensor"),
        (dict(keep={2: torch.tensor([[1]]), 3: torch.tensor([[1], [2]])}), "batch size"),
        (dict(skip=[-2]), "negative layer"),
    ],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(VlmpruneError, match=message):
        Plan(**kwargs)


@pytest.mark.parametrize(
    "plan, message",
    [
        (Plan(keep={8: torch.tensor([[1]])}), "K=8 is out of range.*0..5"),
        (Plan(keep={1: torch.tensor([[10]])}), "index 10 is out of range.*0..9"),
        (Plan(skip=[6]), "layer 6 is out of range"),
        (Plan(keep={1: torch.tensor([[1, 2]]), 3: torch.tensor([[2, 3]])}), "subset"),
        (Plan(keep={1: torch.tensor([[1], [2]])}), "batch 2 but the input has batch 1"),
    ],
)
def test_validation_against_model(plan, message):
    with pytest.raises(VlmpruneError, match=message):
        plan.validate(n_layers=6, n_visual=[10])


def test_unknown_json_field():
    with pytest.raises(VlmpruneError, match="unknown Plan fields"):
        Plan.from_dict({"keep": {}, "drop": []})


@pytest.mark.parametrize(
    "merge, message",
    [
        ({3: torch.tensor([[0, 0, 2]])}, "needs a keep stage"),
        ({1: torch.tensor([[0, 0, 0]])}, "exactly the kept tokens"),
        ({1: torch.tensor([[0, 1, 2]])}, "exactly the kept tokens"),
        ({1: torch.tensor([[0, -2, 2]])}, "targets must be kept tokens or -1"),
    ],
)
def test_merge_validation(merge, message):
    with pytest.raises(VlmpruneError, match=message):
        Plan(keep={1: torch.tensor([[0, 2]])}, merge=merge)


def test_merge_row_length_is_checked_against_the_input():
    plan = Plan(keep={1: torch.tensor([[0, 2]])}, merge={1: torch.tensor([[0, 0, 2]])})
    with pytest.raises(VlmpruneError, match="has 3 targets; sample 0 has 5"):
        plan.validate(n_layers=6, n_visual=[5])
