"""Batched zeroth-order scores (many directions' +- rows in one forward) equal the plain path's two
forwards per direction (to 1e-3; float32 rounding of the losses, ~1e-7, divided by 2 eps), on a causal LM and on all four VLM families, per matrix and per block, |g| and
|w| |g z|; the per-row loss sums give transformers' own loss of any rows alone; prune_weights gives the
same allocation either way; a layout the rows cannot be told apart in is refused by name."""

import functools

import pytest
import torch
import transformers

from conftest import FAMILIES, TEXT, build_model, make_batch
from vlmprune.errors import VlmpruneError
from vlmprune.weights import WeightPruneConfig, prune_weights
from vlmprune.weights.allocation import zeroth_order_scores
from vlmprune.weights.calibrate import find_stacks
from vlmprune.weights.samples import calibration_loss, loss_sums, split_samples
from vlmprune.weights.suffix import SuffixLosses
from vlmprune.weights.zeroth_batched import batched_zeroth_order_scores, stack_directions

EPS = 0.05  # large enough that float32 rounding of the losses moves the scores by < 1e-4 relative


def _setup(family):
    if family == "llama":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 200, (4, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding in one row: that sample is shorter once split
        return model, [dict(input_ids=ids, attention_mask=mask)]
    model = build_model(family).eval()
    return model, [make_batch(family, model, [3, 5], [4, 2], seed=s).kwargs() for s in (0, 1)]


def _blocks(stacks):
    return [(s.name, i, block) for s in stacks for i, block in enumerate(s.blocks)]


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
def test_loss_sums_give_the_models_own_loss_of_any_rows(family):
    model, batches = _setup(family)
    batch = batches[0]
    with torch.no_grad():
        sums = loss_sums(model, batch)
        whole = calibration_loss(model, batch)
    torch.testing.assert_close(sums[:, 0].sum() / sums[:, 1].sum(), whole, rtol=1e-5, atol=1e-6)
    if split_samples([batch], getattr(model.config, "image_token_id", None))[0]["input_ids"].shape[0] == 1:
        for i, row in enumerate(sums):  # a batch that splits by row: each row alone, padding and all
            with torch.no_grad():
                alone = calibration_loss(model, {k: v[i : i + 1] for k, v in batch.items()})
            torch.testing.assert_close(row[0] / row[1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
@pytest.mark.parametrize("mode,score", [("per-matrix", "grad"), ("block", "grad-weight")])
def test_batched_scores_equal_two_whole_forwards_per_direction(family, mode, score):
    model, batches = _setup(family)
    stacks = find_stacks(model)
    blocks = _blocks(stacks)
    linears = [[m for m in block.modules() if isinstance(m, torch.nn.Linear)] for _, _, block in blocks]
    pieces = split_samples(batches, getattr(model.config, "image_token_id", None))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plain = zeroth_order_scores([functools.partial(calibration_loss, model, p) for p in pieces],
                                [[m.weight for m in ls] for ls in linears], eps=EPS, seed=5, mode=mode, score=score)
    for max_directions in (1, 3, 64):  # one direction per forward, groups cut short, everything in one
        groups = stack_directions(pieces, 1, max_directions)
        assert sum(g.directions for g in groups) == len(pieces)
        suffix = SuffixLosses(model, [g.batch for g in groups], stacks, loss_sums)
        got = batched_zeroth_order_scores(suffix.losses(), groups, linears, eps=EPS, seed=5, mode=mode, score=score,
                                          around_block=lambda k: suffix.skipping(*blocks[k][:2]))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=1e-3, atol=0)
        assert suffix.skipped_blocks > 0
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # weights never written
    assert not any("forward" in m.__dict__ for ls in linears for m in ls)  # nothing left patched


def test_stacking_repeats_each_piece_per_direction_and_sign_and_splits_on_shape():
    a = dict(input_ids=torch.tensor([[1, 2, 3]]))
    b = dict(input_ids=torch.tensor([[4, 5, 6]]))
    c = dict(input_ids=torch.tensor([[7, 8]]))
    groups = stack_directions([a, b, c], 2, 4)
    assert [(g.directions, g.rows) for g in groups] == [(4, 1), (2, 1)]
    assert groups[0].batch["input_ids"][:, 0].tolist() == [1, 1, 1, 1, 4, 4, 4, 4]
    assert groups[1].batch["input_ids"].tolist() == [[7, 8]] * 4


def test_prune_weights_allocates_the_same_batched_or_not():
    model, batches = _setup("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    reports = []
    for zeroth_batch in (1, 16):
        model.load_state_dict(dense)
        reports.append(prune_weights(model, batches, WeightPruneConfig(method="ecoflap", sparsity=0.5, score_tokens=4,
                                                                       zeroth_batch=zeroth_batch), progress=False))
    plain, batched = reports
    assert plain.score_directions == batched.score_directions > 1
    torch.testing.assert_close(torch.tensor([u["score"] for u in batched.units]), torch.tensor([u["score"] for u in plain.units]),
                               rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(list(batched.allocated.values())), torch.tensor(list(plain.allocated.values())),
                               rtol=0, atol=1e-3)


def test_rows_that_cannot_be_told_apart_are_refused_naming_the_fix():
    linear = torch.nn.Linear(4, 3)
    groups = stack_directions([dict(input_ids=torch.zeros(1, 2, dtype=torch.long))], 1, 4)

    def loss():  # feeds the linear 3 rows where 2 (one direction, + and -) are stacked
        linear(torch.ones(3, 4))
        return torch.ones(2, 2)

    with pytest.raises(VlmpruneError, match="zeroth_batch=1"):
        batched_zeroth_order_scores([loss], groups, [[linear]])
    assert "forward" not in linear.__dict__


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_zeroth_batch_must_be_a_positive_int(value):
    with pytest.raises(VlmpruneError, match="zeroth_batch"):
        WeightPruneConfig(zeroth_batch=value)
