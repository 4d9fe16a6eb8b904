"""Suffix forwards (skipping the unperturbed blocks before the scored one) give the losses and
zeroth-order scores of whole forwards, on a causal LM and on VLMs (vision and language stacks), and
really skip blocks; a family where skipping would change the loss falls back to whole forwards."""

import functools

import pytest
import torch
import transformers

from conftest import TEXT, build_model, make_batch
from vlmprune.weights import suffix as suffix_module
from vlmprune.weights.allocation import zeroth_order_scores
from vlmprune.weights.calibrate import find_stacks
from vlmprune.weights.prune import calibration_loss
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
