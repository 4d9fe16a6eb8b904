"""Suffix forwards (skipping the unperturbed blocks before the scored one) give the losses and
zeroth-order scores of whole forwards, on a causal LM and on VLMs (vision and language stacks), and
really skip blocks; per-matrix scores with skipping equal a brute force of two whole forwards per matrix
with the same z; a family where skipping would change the loss falls back to whole forwards."""

import functools

import pytest
import torch
import transformers

from conftest import TEXT, build_model, make_batch
from vlmprune.weights import suffix as suffix_module
from vlmprune.weights.allocation import zeroth_order_scores
from vlmprune.weights.calibrate import find_stacks
from vlmprune.weights.samples import calibration_loss
from vlmprune.weights.suffix import SuffixLosses


def _setup(family):
    if family == "llama":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
        gen = torch.Generator().manual_seed(0)
        batches = []
        for n in (3, 2):
            ids = torch.randint(3, 200, (n, 10), generator=gen)
            mask = torch.ones_like(ids)
            mask[0, :3] = 0  # left padding in one row
            batches.append(dict(input_ids=ids, attention_mask=mask))
        return model, batches
    model = build_model(family)
    return model, [make_batch(family, model, [3, 5], [4, 2], seed=s).kwargs() for s in (0, 1)]


def _blocks(stacks):
    """(stack name, index, block) in model order."""
    return [(s.name, i, block) for s in stacks for i, block in enumerate(s.blocks)]


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl", "qwen2_5_vl"])
def test_suffix_losses_equal_whole_forwards_and_skip_blocks(family):
    model, batches = _setup(family)
    stacks = find_stacks(model)
    with torch.no_grad():
        whole = [float(calibration_loss(model, b)) for b in batches]
    suffix = SuffixLosses(model, batches, stacks, calibration_loss)
    losses = suffix.losses()
    for name, index, _ in _blocks(stacks):
        with suffix.skipping(name, index), torch.no_grad():
            got = [float(fn()) for fn in losses]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(whole), rtol=1e-5, atol=1e-6)
    # every test batch has images, so each entry skips `index` blocks per batch (the check adds a few)
    assert suffix.skipped_blocks >= sum(i * len(batches) for _, i, _ in _blocks(stacks)) > 0
    for _, _, block in _blocks(stacks):  # nothing left patched
        assert "forward" not in block.__dict__


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_zeroth_order_scores_with_skipping_equal_whole_forwards(family):
    model, batches = _setup(family)
    stacks = find_stacks(model)
    blocks = _blocks(stacks)
    whole = zeroth_order_scores([functools.partial(calibration_loss, model, b) for b in batches], [b for _, _, b in blocks], seed=3)
    suffix = SuffixLosses(model, batches, stacks, calibration_loss)
    fast = zeroth_order_scores(
        suffix.losses(), [b for _, _, b in blocks], seed=3, around_block=lambda k: suffix.skipping(*blocks[k][:2])
    )
    assert suffix.skipped_blocks > 0
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(whole), rtol=1e-3, atol=0)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_per_matrix_scores_with_skipping_equal_a_brute_force_with_the_same_z(family):
    """Per matrix with the suffix trick, as prune_weights runs it: every pair of forwards moves exactly one
    linear's weight by +- eps z (z read off the weights), every linear once per batch; and the block
    scores equal |L(w + eps z) - L(w - eps z)| / (2 eps) from two *whole* forwards per matrix and batch
    (no skipping), summed over the block's matrices and averaged over the batches."""
    model, batches = _setup(family)
    stacks = find_stacks(model)
    blocks = _blocks(stacks)
    weights = [[m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)] for _, _, block in blocks]
    flat = [w for ws in weights for w in ws]
    dense = [w.detach().clone() for w in flat]
    suffix = SuffixLosses(model, batches, stacks, calibration_loss)
    seen = []  # (batch, index of the perturbed matrix, its weights) at every loss call

    def recording(b, fn):
        moved = [i for i, (w, d) in enumerate(zip(flat, dense)) if not torch.equal(w, d)]
        assert len(moved) == 1  # one matrix at a time
        seen.append((b, moved[0], flat[moved[0]].detach().clone()))
        return fn()

    losses = [functools.partial(recording, b, fn) for b, fn in enumerate(suffix.losses())]
    eps = 1e-3
    got = zeroth_order_scores(losses, weights, eps=eps, seed=7, around_block=lambda k: suffix.skipping(*blocks[k][:2]))
    assert suffix.skipped_blocks > 0
    assert all(torch.equal(w, d) for w, d in zip(flat, dense))
    assert len(seen) == 2 * len(flat) * len(batches)
    assert [(b, i) for b, i, _ in seen[::2]] == [(b, i) for i in range(len(flat)) for b in range(len(batches))]

    expected, owner = [0.0] * len(blocks), [k for k, ws in enumerate(weights) for _ in ws]
    with torch.no_grad():
        for (b, i, plus), (b2, i2, minus) in zip(seen[::2], seen[1::2]):
            assert (b, i) == (b2, i2)
            z = (plus - dense[i]) / eps
            torch.testing.assert_close(minus, dense[i] - eps * z, rtol=0, atol=1e-6)
            values = []
            for w in (dense[i] + eps * z, dense[i] - eps * z):
                flat[i].copy_(w)
                values.append(float(calibration_loss(model, batches[b])))  # a whole forward
            flat[i].copy_(dense[i])
            expected[owner[i]] += abs(values[0] - values[1]) / (2 * eps) / len(batches)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=0)


def test_skipping_falls_back_to_whole_forwards_when_the_check_fails(monkeypatch):
    model, batches = _setup("llama")
    monkeypatch.setattr(suffix_module, "MATCH_RTOL", -1.0)  # no loss can match: the check must fail
    suffix = SuffixLosses(model, batches, find_stacks(model), calibration_loss)
    with torch.no_grad():
        whole = float(calibration_loss(model, batches[0]))
        with pytest.warns(UserWarning, match="run whole forwards"):
            with suffix.skipping("language", 1):
                skipped_during_check = suffix.skipped_blocks
                assert float(suffix.losses()[0]()) == whole
        with suffix.skipping("language", 1):
            assert float(suffix.losses()[0]()) == whole
    assert suffix.skipped_blocks == skipped_during_check  # nothing skipped after the failed check
