"""Token methods: kept indices equal brute-force references from full eager attention maps or the definition."""

import pytest
import torch

import vlmprune
from conftest import FAMILIES, IMAGE_TOKEN, make_batch, sample_inputs
from reference import dropped_mask, masked_attentions
from vlmprune.engine.sequence import TokenState
from vlmprune.methods.base import SampleShape
from vlmprune.methods.token.pool import pooled_groups


def _batch(tiny_models, family):
    model = tiny_models(family)
    return model, make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")


def _topk_from_maps(maps, layer, batch, present, keep):
    """Brute force: the last token's head-mean attention in `layer`, over each sample's present visual tokens."""
    visual = batch.input_ids == IMAGE_TOKEN
    out = []
    for b in range(visual.shape[0]):
        scores = maps[layer][b, :, -1].mean(0)[visual[b]]  # one score per visual index
        scores = torch.where(present[b], scores, torch.tensor(float("-inf")))
        n = int(present[b].sum())
        k = max(1, min(n, round(keep * n)))
        out.append(scores.topk(k).indices.sort().values)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_the_brute_force_top_tokens(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    maps = masked_attentions(tiny_models(family, "eager"), family, batch, {})
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=vlmprune.FastV(layer=3, keep=0.3))
    present = [torch.ones(n, dtype=torch.bool) for n in batch.n_visual]
    expected = _topk_from_maps(maps, 2, batch, present, 0.3)
    assert [r.tolist() for r in out.stats.plan.keep[3]] == [e.tolist() for e in expected]
    assert out.stats.visual_tokens[:, 3].tolist() == [e.numel() for e in expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_pdrop_stages_follow_masked_reference_attention(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    eager = tiny_models(family, "eager")
    method = vlmprune.PDrop(keep=0.25, stages=(0.34, 0.67))  # 6 layers -> stages at layers 2 and 4
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=method)
    assert sorted(out.stats.plan.keep) == [2, 4]
    drops, present = {}, [torch.ones(n, dtype=torch.bool) for n in batch.n_visual]
    for layer in (2, 4):
        maps = masked_attentions(eager, family, batch, drops)
        expected = _topk_from_maps(maps, layer - 1, batch, present, method.stage_ratio(6))
        assert [r.tolist() for r in out.stats.plan.keep[layer]] == [e.tolist() for e in expected], layer
        present = [torch.isin(torch.arange(n), e) for n, e in zip(batch.n_visual, expected)]
        drops[layer] = dropped_mask(batch, expected)


def test_pdrop_final_share_is_keep_when_stages_round_to_one_layer(tiny_models):
    """Stages that round to the same layer are one stage: lambda = keep ** (1 / distinct stage layers),
    so the final share is `keep` (closed form: 16 -> 8 -> 4 tokens for keep 0.25 over two stages)."""
    model, batch = _batch(tiny_models, "llava")  # 16 visual tokens per sample, 6 layers
    method = vlmprune.PDrop(keep=0.25, stages=(0.3, 0.34, 0.67))  # 0.3 and 0.34 both round to layer 2
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=method)
    assert sorted(out.stats.plan.keep) == [2, 4]
    assert [r.numel() for r in out.stats.plan.keep[2]] == [n // 2 for n in batch.n_visual]
    assert [r.numel() for r in out.stats.plan.keep[4]] == [n // 4 for n in batch.n_visual]
    assert method.schedule(SampleShape(n_text=10, n_visual=16, text_after=6), 6).keep == {2: 8, 4: 4}
    # a 3-layer model: the default stages (0.25, 0.5, 0.75) land on layers 1, 2, 2
    default = vlmprune.PDrop(keep=0.25)
    assert default.schedule(SampleShape(n_text=10, n_visual=144, text_after=6), 3).keep == {1: 72, 2: 36}
    assert default.stage_ratio(3) == pytest.approx(0.25 ** (1 / 2))
    assert default.stage_ratio(8) == pytest.approx(0.25 ** (1 / 3))  # layers 2, 4, 6: three stages


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pool_equals_adaptive_average_pooling(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    plan, _ = vlmprune.Pool(keep=0.25).decide(pm, prep)
    state = TokenState.from_prepared(prep).keep_visual(plan.keep[0], plan.merge[0])
    for b, (rows, cols) in enumerate(prep.visual_grids):
        assert rows * cols == batch.n_visual[b] and rows % 2 == 0 and cols % 2 == 0
        grid = prep.inputs_embeds[b, prep.visual_mask[b]].view(rows, cols, -1).permute(2, 0, 1)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (rows // 2, cols // 2)).permute(1, 2, 0).reshape(-1, grid.shape[0])
        got = state.hidden[b, state.visual_index[b] >= 0]
        torch.testing.assert_close(got, pooled, atol=1e-6, rtol=0)


def test_pooled_groups_partition_the_grid():
    assign, keep = pooled_groups(12, 12, 36)
    assert keep.numel() == 36 and torch.equal(torch.unique(assign), keep)
    assert torch.bincount(assign)[keep].tolist() == [4] * 36
    assert pooled_groups(5, 7, 6)[1].numel() == 6


def test_random_is_seeded_and_sized(tiny_models):
    model, batch = _batch(tiny_models, "llava_next")
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    a, _ = vlmprune.Random(keep=0.5, layer=1, seed=3).decide(pm, prep)
    b, _ = vlmprune.Random(keep=0.5, layer=1, seed=3).decide(pm, prep)
    c, _ = vlmprune.Random(keep=0.5, layer=1, seed=4).decide(pm, prep)
    assert a == b and a != c
    assert [r.numel() for r in a.keep[1]] == [round(n / 2) for n in batch.n_visual]


@pytest.mark.parametrize("family", FAMILIES)
def test_random_draws_belong_to_the_sample_not_its_batch_position(tiny_models, family):
    """Each sample its own draw: two batches of different samples differ at every position, while a
    sample alone, left- or right-padded in a batch, or at another position gets the same tokens."""
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    method = vlmprune.Random(keep=0.5, seed=3)
    draw = lambda batch: [r.tolist() for r in method.decide(pm, pm.prepare(**batch.kwargs()))[0].keep[0]]
    first = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left", seed=0)
    second = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left", seed=1)  # other samples, same counts
    assert first.n_visual == second.n_visual
    together, others = draw(first), draw(second)
    for b in range(3):
        assert together[b] != others[b], b  # a different sample at the same position draws afresh
    assert draw(make_batch(family, model, [3, 6, 1], [4, 2, 7], "right", seed=0)) == together
    for b in range(3):  # alone, sample b sits at position 0
        assert draw(sample_inputs(family, first, b)) == [together[b]], b
    assert draw(first) == together  # the same seed, the same draw


def test_a_method_in_generate_equals_its_applied_plan(tiny_models):
    model, batch = _batch(tiny_models, "qwen2_5_vl")
    pm = vlmprune.wrap(model)
    method = vlmprune.FastV(layer=2, keep=0.2)
    applied = pm(**batch.kwargs(), prune=method).stats.plan
    kw = dict(**batch.kwargs(), max_new_tokens=6, eos_token_id=())
    assert torch.equal(pm.generate(**kw, prune=method), pm.generate(**kw, prune=applied))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: vlmprune.FastV(keep=1.5), r"outside \(0, 1\]"),
        (lambda: vlmprune.FastV(keep=0.0), r"outside \(0, 1\]"),
        (lambda: vlmprune.FastV(layer=0), "layer K must be >= 1"),
        (lambda: vlmprune.Random(keep=-3), "count must be >= 1"),
        (lambda: vlmprune.PDrop(stages=(0.5, 0.2)), "increasing fractions"),
        (lambda: vlmprune.build_method("fastvv"), "unknown pruning method 'fastvv'; known methods: .*fastv"),
        (lambda: vlmprune.VisionZip(keep=1.5), r"keep=1.5 is outside \(0, 1\]"),
        (lambda: vlmprune.VisionZip(keep=0.0), r"outside \(0, 1\]"),
        (lambda: vlmprune.VisionZip(keep=-3), "count must be >= 1"),
        (lambda: vlmprune.VisionZip(keep="all"), r"ratio in \(0, 1\] or a token count"),
        (lambda: vlmprune.VisionZip(dominant_share=1.2), r"dominant_share=1.2 is outside \[0, 1\]"),
    ],
)
def test_bad_configs_name_the_valid_range(make, message):
    with pytest.raises(vlmprune.VlmpruneError, match=message):
        make()


@pytest.mark.parametrize("method, lowest_layer", [(vlmprune.FastV, 1), (vlmprune.VisionZip, 0)])
def test_budgets_checked_against_the_input(tiny_models, method, lowest_layer):
    model, batch = _batch(tiny_models, "llava")
    pm = vlmprune.wrap(model)
    with pytest.raises(vlmprune.VlmpruneError, match="only 16; use a count <= 16"):
        pm(**batch.kwargs(), prune=method(keep=40))
    with pytest.raises(vlmprune.VlmpruneError, match=rf"layer=9 is out of range.*{lowest_layer}\.\.5"):
        pm(**batch.kwargs(), prune=method(layer=9))


def _sparsevlm_brute_force(maps, hidden, batch, layer, keep, recycle=0.3, cluster_size=4, n_stages=2):
    """SparseVLM's first stage from full eager maps and the model's own hidden states, sample by sample."""
    import math

    visual = batch.input_ids == IMAGE_TOKEN
    keeps, assigns = [], []
    for b in range(visual.shape[0]):
        pos = visual[b].nonzero().squeeze(1)
        text = batch.attention_mask[b].bool() & ~visual[b]
        text[: int(pos[0])] = False
        probs = maps[layer - 1][b].mean(0)[text]  # (R, L) head-mean rows of the text that sees the image
        mass = probs[:, pos].sum(-1)
        scores = probs[mass >= mass.mean()].mean(0)[pos]
        n = pos.numel()
        k = max(1, min(n, round(keep ** (1 / n_stages) * n)))
        ranked = torch.argsort(scores, descending=True, stable=True)
        deleted = ranked[k:]
        n_rec = math.ceil(recycle * len(deleted))
        n_c = min(k - 1, math.ceil(n_rec / cluster_size))
        kept, recycled, centres = ranked[: k - n_c], deleted[:n_rec], deleted[:n_c]
        assign = torch.full((n,), -1)
        assign[kept] = kept
        h = torch.nn.functional.normalize(hidden[layer][b, pos].float(), dim=-1)
        if n_c:
            assign[recycled] = centres[(h[recycled] @ h[centres].T).argmax(1)]
            assign[centres] = centres
        keeps.append(torch.sort(torch.cat([kept, centres])).values)
        assigns.append(assign)
    return keeps, assigns


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsevlm_first_stage_equals_brute_force(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    eager = tiny_models(family, "eager")
    from reference import _hf_inputs

    with torch.no_grad():
        out_eager = eager(**_hf_inputs(family, batch.input_ids, batch.attention_mask, batch.vision), output_attentions=True, output_hidden_states=True)
    method = vlmprune.SparseVLM(keep=0.25, stages=(0.34, 0.67))
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=method)
    assert sorted(out.stats.plan.keep) == [2, 4]
    keeps, assigns = _sparsevlm_brute_force(out_eager.attentions, out_eager.hidden_states, batch, 2, 0.25)
    assert [r.tolist() for r in out.stats.plan.keep[2]] == [k.tolist() for k in keeps]
    assert [r.tolist() for r in out.stats.plan.merge[2]] == [a.tolist() for a in assigns]
    assert out.stats.visual_tokens[:, 2].tolist() == [k.numel() for k in keeps]
    # the second stage keeps lambda of what the first kept, and merged tokens keep their count
    assert (out.stats.visual_tokens[:, 4] <= out.stats.visual_tokens[:, 2]).all()
