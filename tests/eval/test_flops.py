"""The analytic prefill FLOPs equal torch's FlopCounterMode on the running engine, pruned and unpruned."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmprune
from conftest import make_batch
from vlmprune.engine.runner import prefill
from vlmprune.eval.flops import prefill_flops


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("plan", ["none", "drop", "skip", "both"])
def test_prefill_flops_match_flop_counter(tiny_models, family, plan):
    # eager attention: CPU sdpa's fused kernel is invisible to FlopCounterMode, its matmuls are not
    model = tiny_models(family, "eager")
    batch = make_batch(family, model, [5], [6], "left")
    n_vis = batch.n_visual[0]
    plans = {
        "none": vlmprune.Plan(),
        "drop": vlmprune.Plan(keep={2: torch.arange(0, n_vis, 3)[None]}),
        "skip": vlmprune.Plan(skip=[1, 4]),
        "both": vlmprune.Plan(keep={0: torch.arange(0, n_vis, 2)[None]}, skip=[5]),
    }
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        res = prefill(pm.adapter, prep, plans[plan], logits_to_keep=1)
    measured = counter.get_total_flops()
    predicted = float(prefill_flops(pm.adapter.text_config, res.stats)[0])
    assert abs(predicted - measured) / measured < 0.03
