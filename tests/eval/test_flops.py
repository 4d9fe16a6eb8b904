"""The accountant equals torch's FlopCounterMode on whole forwards (vision tower, projector, LM, head,
scoring) of all four families, pruned and unpruned; FastV's convention equals a closed form by hand."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmprune
from conftest import FAMILIES, IMAGE_TOKEN, make_batch, sample_inputs
from vlmprune.engine.runner import prefill
from vlmprune.eval.flops import prefill_flops

# eager attention throughout: CPU sdpa's fused kernel is invisible to FlopCounterMode, eager's matmuls are not


def _plans(n_vis: int) -> dict:
    return {
        "none": vlmprune.Plan(),
        "drop": vlmprune.Plan(keep={2: torch.arange(0, n_vis, 3)[None]}),
        "skip": vlmprune.Plan(skip=[1, 4]),
        "both": vlmprune.Plan(keep={0: torch.arange(0, n_vis, 2)[None]}, skip=[5]),
        "fastv": vlmprune.FastV(layer=2, keep=0.3),
        "sparsevlm": vlmprune.SparseVLM(keep=0.3, stages=(0.34, 0.67)),
        "dart": vlmprune.build_method("dart", layer=2, keep=0.3),
        "divprune": vlmprune.build_method("divprune", keep=0.3),
        "cdpruner": vlmprune.build_method("cdpruner", keep=0.3),
    }


def _counted(pm, kwargs: dict, prune) -> tuple[float, "vlmprune.PrunedOutput"]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = pm(**kwargs, prune=prune, logits_to_keep=1)
    return counter.get_total_flops(), out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("plan", ["none", "drop", "skip", "both"])
def test_prefill_flops_match_flop_counter(tiny_models, family, plan):
    """The language model alone (prepared inputs in, last-token logits out)."""
    model = tiny_models(family, "eager")
    batch = make_batch(family, model, [5], [6], "left")
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        res = prefill(pm.adapter, prep, _plans(batch.n_visual[0])[plan], logits_to_keep=1)
    measured = counter.get_total_flops()
    predicted = float(prefill_flops(pm.adapter.text_config, res.stats)[0])
    assert abs(predicted - measured) / measured < 0.03


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", ["none", "drop", "skip", "both", "fastv", "sparsevlm", "dart", "divprune", "cdpruner"])
def test_whole_forward_matches_flop_counter(tiny_models, family, plan):
    """Vision tower + projector + decoder + head + scoring rows of the whole call, within 3%."""
    model = tiny_models(family, "eager")
    batch = make_batch(family, model, [5], [6], "left")
    pm = vlmprune.wrap(model)
    measured, out = _counted(pm, batch.kwargs(), _plans(batch.n_visual[0])[plan])
    report = vlmprune.flops(pm, out.stats, **batch.kwargs())
    assert abs(float(report.total[0]) - measured) / measured < 0.03
    assert float(report.vision_tower[0]) > 0 and float(report.projector[0]) > 0
    assert (float(report.scoring[0]) > 0) == (plan in ("fastv", "sparsevlm", "dart", "divprune", "cdpruner"))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method", [vlmprune.FastV(layer=3, keep=0.5), vlmprune.PDrop(keep=0.25, stages=(0.34, 0.67))])
def test_scoring_overhead_is_what_the_policy_adds(tiny_models, family, method):
    """A policy run minus the same decisions replayed as a plain plan = the scoring rows, exactly."""
    model = tiny_models(family, "eager")
    batch = make_batch(family, model, [4], [7], "left")
    pm = vlmprune.wrap(model)
    with_policy, out = _counted(pm, batch.kwargs(), method)
    replayed, _ = _counted(pm, batch.kwargs(), out.stats.plan)
    scoring = float(vlmprune.flops(pm, out.stats, **batch.kwargs()).scoring[0])
    assert scoring == pytest.approx(with_policy - replayed, rel=1e-6)


def _qwen_multi_image_batch(n_text_after: int = 2):
    """Sample 0: two images (one with ragged attention windows), sample 1: one image; left padding."""
    grid = torch.tensor([[1, 10, 6], [1, 6, 14], [1, 4, 4]])
    tokens = (grid.prod(-1) // 4).tolist()
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    rows = [
        [2, 5, 6] + [IMAGE_TOKEN] * tokens[0] + [7] + [IMAGE_TOKEN] * tokens[1] + [8] * n_text_after,
        [2, 5] + [IMAGE_TOKEN] * tokens[2] + [9] * (n_text_after + 1),
    ]
    length = max(map(len, rows))
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row)
        mask[b, length - len(row):] = 1
    split = int(grid[:2].prod(-1).sum())
    alone = [
        dict(input_ids=ids[0:1, mask[0].bool()], attention_mask=mask[0:1, mask[0].bool()], pixel_values=pix[:split], image_grid_thw=grid[:2]),
        dict(input_ids=ids[1:2, mask[1].bool()], attention_mask=mask[1:2, mask[1].bool()], pixel_values=pix[split:], image_grid_thw=grid[2:]),
    ]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid), alone


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_several_images_and_edge_windows(tiny_models, family):
    """Images are assigned to their samples; Qwen2.5-VL's edge windows (a 5x3 merged grid in 2x2
    windows) are priced as they run; a padded batch prices each sample as if alone (padding is free)."""
    pm = vlmprune.wrap(tiny_models(family, "eager"))
    batched, alone = _qwen_multi_image_batch()
    report = vlmprune.flops(pm, pm(**batched, logits_to_keep=1).stats, **batched)
    for b, kwargs in enumerate(alone):
        measured, out = _counted(pm, kwargs, None)
        single = vlmprune.flops(pm, out.stats, **kwargs)
        assert abs(float(single.total[0]) - measured) / measured < 0.03
        assert float(report.total[b]) == float(single.total[0])


def test_llava_next_tiles_per_sample(tiny_models):
    """LLaVA-NeXT: each image's anyres tiles priced for its own sample, equal to the sample alone."""
    model = tiny_models("llava_next", "eager")
    batch = make_batch("llava_next", model, [3, 6, 1], [4, 2, 7], "left")
    pm = vlmprune.wrap(model)
    report = vlmprune.flops(pm, pm(**batch.kwargs(), logits_to_keep=1).stats, **batch.kwargs())
    for b in range(3):
        kwargs = sample_inputs("llava_next", batch, b).kwargs()
        measured, out = _counted(pm, kwargs, None)
        assert abs(float(report.total[b]) - measured) / measured < 0.03


def test_fastv_convention_and_exact_counts_by_hand(tiny_models):
    """LLaVA tiny: d=64, m=128, 4 query heads and 2 key/value heads of 16, 6 layers; a prompt of 12 text +
    16 visual tokens; 4 visual tokens kept from layer 2 on, layer 4 skipped: layers 0-1 see 28 tokens,
    layers 2, 3 and 5 see 16."""
    pm = vlmprune.wrap(tiny_models("llava"))
    batch = make_batch("llava", pm.model, [5], [6], "left")
    plan = vlmprune.Plan(keep={2: torch.tensor([[0, 5, 10, 15]])}, skip=[4])
    # FastV: 4*n*d^2 + 2*n^2*d + 2*n*d*m per layer run
    f28 = 4 * 28 * 64**2 + 2 * 28**2 * 64 + 2 * 28 * 64 * 128  # 1,017,856
    f16 = 4 * 16 * 64**2 + 2 * 16**2 * 64 + 2 * 16 * 64 * 128  # 557,056
    fastv_tflops = (2 * f28 + 3 * f16) / 1e12  # 3.70688e-6
    # exact MACs: q,o 2*n*d*64 + k,v 2*n*d*32 + scores, values 2*n^2*64 + SwiGLU 3*n*d*m
    m28 = 2 * 28 * 64 * 64 + 2 * 28 * 64 * 32 + 2 * 28**2 * 64 + 3 * 28 * 64 * 128  # 1,132,544
    m16 = 2 * 16 * 64 * 64 + 2 * 16 * 64 * 32 + 2 * 16**2 * 64 + 3 * 16 * 64 * 128  # 622,592
    exact_flops = 2 * (2 * m28 + 3 * m16)  # 8,265,728
    full_flops = 2 * 6 * m28
    out = pm(**batch.kwargs(), prune=plan, logits_to_keep=1)
    for report in (vlmprune.flops(pm, out.stats), vlmprune.flops(pm.config, plan, n_text=12, n_visual=16)):
        assert float(report.lm_tflops_fastv[0]) == pytest.approx(fastv_tflops, rel=1e-12)
        assert float(report.lm_prefill[0]) == exact_flops
        assert float(report.lm_prefill_full[0]) == full_flops
        assert float(report.share[0]) == pytest.approx(exact_flops / full_flops)
        assert float(report.lm_head[0]) == 2 * 64 * 256  # one row, vocab 256


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plan_prices_like_the_run_of_it(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "right")
    pm = vlmprune.wrap(model)
    keep = [torch.arange(0, n, 2) for n in batch.n_visual]
    plan = vlmprune.Plan(keep={1: keep}, skip=[[2], [3, 4], []])
    out = pm(**batch.kwargs(), prune=plan, logits_to_keep=1)
    from_run = vlmprune.flops(pm, out.stats, **batch.kwargs()).to_dict()
    from_plan = vlmprune.flops(pm, plan, **batch.kwargs()).to_dict()
    assert from_plan == from_run
    unpruned = vlmprune.flops(pm, pm(**batch.kwargs()).stats, **batch.kwargs())
    assert unpruned.share.tolist() == [1.0] * 3 and unpruned.batch_share == 1.0
    assert unpruned.lm_head.tolist() == [2 * 64 * 256 * n for n in batch.attention_mask.sum(1).tolist()]


def test_clear_errors(tiny_models):
    model = tiny_models("qwen2_5_vl")
    batch = make_batch("qwen2_5_vl", model, [3], [4])
    pm = vlmprune.wrap(model)
    stats = pm(**batch.kwargs()).stats
    with pytest.raises(vlmprune.VlmpruneError, match="needs image_grid_thw"):
        vlmprune.flops(pm, stats)
    assert not vlmprune.flops(pm, stats, vision=False).vision_priced
    with pytest.raises(vlmprune.VlmpruneError, match="unexpected inputs"):
        vlmprune.flops(pm, stats, grid_thw=None)
    with pytest.raises(vlmprune.VlmpruneError, match="needs the prompt"):
        vlmprune.flops(pm, vlmprune.Plan(skip=[1]))
    with pytest.raises(vlmprune.VlmpruneError, match="RunStats or a Plan"):
        vlmprune.flops(pm, "plan")
    with pytest.raises(vlmprune.VlmpruneError, match="supported family"):
        vlmprune.flops(torch.nn.Linear(2, 2), stats)
    with pytest.raises(vlmprune.VlmpruneError, match="out of range"):
        vlmprune.flops(pm, vlmprune.Plan(skip=[9]), n_text=4, n_visual=16, vision=False)
    wrong = dict(batch.vision, image_grid_thw=torch.tensor([[1, 8, 12]]))
    with pytest.raises(vlmprune.VlmpruneError, match="visual tokens but its prompt has"):
        vlmprune.flops(pm, stats, **wrong)
