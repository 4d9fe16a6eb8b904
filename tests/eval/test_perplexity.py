"""Perplexity equals a brute-force per-token log-softmax loop, a left-padded row scores as it does alone,
and the held-out text is the end of the topics stream, disjoint from the calibration slice."""

import math

import pytest
import torch
import transformers

from conftest import TEXT
from vlmprune.errors import VlmpruneError
from vlmprune.eval.perplexity import heldout_batches, perplexity, token_nll
from vlmprune.testbed.recipe import build_tokenizer
from vlmprune.data.calibration import text_batches, topic_token_ids


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()


def test_perplexity_equals_a_brute_force_loop():
    model = _llama()
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    batches = [dict(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2])), dict(input_ids=ids[2:], attention_mask=torch.ones_like(ids[2:]))]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=row[None]).logits[0].double()
            for t in range(1, len(row)):
                total -= torch.log_softmax(logits[t - 1], -1)[row[t]].item()
                count += 1
    assert perplexity(model, batches) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_left_padded_row_scores_as_it_does_alone():
    model = _llama()
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(3, 200, (6,), generator=gen), torch.randint(3, 200, (10,), generator=gen)
    padded = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), torch.ones(6, dtype=torch.long)]), torch.ones(10, dtype=torch.long)])
    with torch.no_grad():
        both = token_nll(model, dict(input_ids=padded, attention_mask=mask))
        alone = [token_nll(model, dict(input_ids=r[None], attention_mask=torch.ones_like(r[None]))) for r in (short, long)]
    assert both[1] == 5 + 9 == alone[0][1] + alone[1][1]
    assert both[0] == pytest.approx(alone[0][0] + alone[1][0], rel=1e-5)


def test_heldout_text_is_the_end_and_disjoint_from_calibration():
    tokenizer = build_tokenizer(["the", "a", "of", "is", "to"])  # word-level: unknown words -> <unk>
    ids = topic_token_ids(tokenizer)
    calib = text_batches(tokenizer, 16, seq_len=32)
    held = heldout_batches(tokenizer, 4, seq_len=32, batch_size=3, calibration_tokens=16 * 32)
    held_ids = torch.cat([b["input_ids"] for b in held]).reshape(-1).tolist()
    assert held_ids == ids[-4 * 32 :]
    assert torch.cat([b["input_ids"] for b in calib]).reshape(-1).tolist() == ids[: 16 * 32]
    assert len(ids) - 4 * 32 >= 16 * 32  # the two slices do not meet
    with pytest.raises(VlmpruneError, match="overlap"):
        heldout_batches(tokenizer, len(ids) // 32, seq_len=32, calibration_tokens=64)
