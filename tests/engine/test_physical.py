"""Physical drops and skips equal masked / identity references, through prefill and 8 decode steps."""

import pytest
import torch

import vlmprune
from conftest import FAMILIES, make_batch
from reference import greedy_reference


def _keep(batch, ratio, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[: max(1, int(n * ratio))] for n in batch.n_visual]


def _check(pm, model, family, batch, plan, keep, drop_from, skip):
    ref_tokens, ref_scores = greedy_reference(model, family, batch, keep, drop_from, skip, steps=8)
    out = pm.generate(**batch.kwargs(), prune=plan, max_new_tokens=8, eos_token_id=(), return_dict=True)
    assert torch.equal(out.sequences[:, -8:], ref_tokens)
    for ours, ref in zip(out.scores, ref_scores):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    return out


@pytest.mark.parametrize("drop_from", [0, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_equals_masked_reference(tiny_models, family, drop_from):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    keep = _keep(batch, 0.3)
    pm = vlmprune.wrap(model)
    _check(pm, model, family, batch, vlmprune.Plan(keep={drop_from: keep}), keep, drop_from, ())


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_equals_identity_reference(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    pm = vlmprune.wrap(model)
    _check(pm, model, family, batch, vlmprune.Plan(skip=[1, 4]), None, 99, (1, 4))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_drop_and_skip_together(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    keep = _keep(batch, 0.25, seed=4)
    pm = vlmprune.wrap(model)
    _check(pm, model, family, batch, vlmprune.Plan(keep={3: keep}, skip=[1, 5]), keep, 3, (1, 5))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_kv_cache_holds_only_what_each_layer_saw(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    keep = _keep(batch, 0.5)
    keep2 = [k[: max(1, k.numel() // 3)] for k in keep]
    plan = vlmprune.Plan(keep={2: keep, 4: keep2}, skip=[3])
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    res = vlmprune.engine.prefill(pm.adapter, prep, plan)
    n_tokens = batch.attention_mask.sum(1)
    n_text = n_tokens - torch.tensor(batch.n_visual)
    kept1 = torch.tensor([k.numel() for k in keep])
    kept2 = torch.tensor([k.numel() for k in keep2])
    expected = torch.stack([n_tokens, n_tokens, n_text + kept1, torch.zeros(3, dtype=torch.long), n_text + kept2, n_text + kept2], 1)
    assert torch.equal(res.stats.kv_entries, expected)
    assert res.cache.keys[3] is None and res.cache.values[3] is None
    for layer in (0, 1, 2, 4, 5):  # physical sizes: the longest sample, nothing more
        assert res.cache.keys[layer].shape[2] == int(expected[:, layer].max())
    assert torch.equal(res.stats.visual_tokens[:, 4], kept2) and torch.equal(res.stats.visual_tokens[:, 0], torch.tensor(batch.n_visual))
    # decoding keeps the decision: each running layer grows by one entry per step, skipped ones stay empty
    out = pm.generate(**batch.kwargs(), prune=plan, max_new_tokens=5, eos_token_id=(), return_dict=True)
    grown = expected + 4 * (expected > 0)
    assert torch.equal(out.stats.kv_entries, grown)


def test_multistage_equals_two_masks(tiny_models):
    """Two stages: the reference masks stage-1 drops from layer 2 and stage-2 drops from layer 4."""
    from reference import dropped_mask, staged_forward

    family = "llava"
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    keep1 = _keep(batch, 0.5)
    keep2 = [k[: k.numel() // 2] for k in keep1]
    drops = {2: dropped_mask(batch, keep1), 4: dropped_mask(batch, keep2)}
    ref = staged_forward(model, family, batch.input_ids, batch.attention_mask, batch.vision, drops).logits[:, -1]
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=vlmprune.Plan(keep={2: keep1, 4: keep2}), logits_to_keep=1)
    torch.testing.assert_close(out.last_logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_merge_at_layer0_equals_feeding_the_merged_sequence(tiny_models, family):
    """K=0 merge == the unmodified model fed only the kept tokens, each the mean of its group, at its own position."""
    model = tiny_models(family)
    batch = make_batch(family, model, [3], [4], "left")
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    n = batch.n_visual[0]
    gen = torch.Generator().manual_seed(0)
    keep = torch.randperm(n, generator=gen)[: n // 4].sort().values
    assign = keep[torch.randint(0, keep.numel(), (n,), generator=gen)]
    assign[keep] = keep
    assign[torch.randperm(n, generator=gen)[:3]] = -1  # some discarded outright
    assign[keep] = keep
    plan = vlmprune.Plan(keep={0: keep[None]}, merge={0: assign[None]})
    out = pm(**batch.kwargs(), prune=plan, logits_to_keep=1)
    # reference: build the merged, shortened sequence by hand and run transformers on it
    embeds, pos = prep.inputs_embeds[0].clone(), prep.position_ids[:, 0]
    vis = prep.visual_mask[0].nonzero().squeeze(1)
    for t in keep:
        group = (assign == t).nonzero().squeeze(1)
        embeds[vis[t]] = prep.inputs_embeds[0, vis[group]].mean(0)
    kept_pos = torch.ones(embeds.shape[0], dtype=torch.bool)
    kept_pos[vis] = False
    kept_pos[vis[keep]] = True
    with torch.no_grad():
        lm = model.model.language_model(inputs_embeds=embeds[kept_pos][None], position_ids=pos[:, kept_pos][:, None] if pos.shape[0] == 3 else pos[:, kept_pos])
        ref = model.lm_head(lm.last_hidden_state[:, -1])
    torch.testing.assert_close(out.last_logits, ref, atol=1e-4, rtol=0)
    assert out.stats.plan.merge[0][0].tolist() == assign.tolist()
    assert vlmprune.Plan.from_json(plan.to_json()) == plan


class _DropAndSkipLater:
    """A policy that, at its layer, keeps fixed visual tokens and skips later layers."""

    def __init__(self, layer, keep, skip):
        self.layers, self.keep, self.skip = (layer,), keep, skip

    def select(self, layer, view):
        return vlmprune.Plan(keep={layer: self.keep}, skip=self.skip)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_a_policy_may_skip_later_layers(tiny_models, family):
    """A decision taken inside the model at layer 3 that also skips layers 4 and 5 equals the masked /
    identity reference through prefill and decoding; skipping a layer that has run is refused."""
    from vlmprune.engine.runner import prefill

    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    keep = _keep(batch, 0.25, seed=4)
    pm = vlmprune.wrap(model)

    class Method:
        def decide(self, pm, prep):
            return vlmprune.Plan(), [_DropAndSkipLater(3, keep, [4, 5])]

    out = _check(pm, model, family, batch, Method(), keep, 3, (4, 5))
    assert out.stats.plan.skip_sets(3) == (frozenset({4, 5}),) * 3 and not out.stats.layers_run[:, 4:].any()
    prep = pm.prepare(**batch.kwargs())
    with pytest.raises(vlmprune.VlmpruneError, match="skips layer 1 of sample 0, which has already run"):
        prefill(pm.adapter, prep, vlmprune.Plan(), [_DropAndSkipLater(3, keep, [1, 4])])
    # a later decision may keep only tokens still present: sample 1 asks again for one dropped at layer 2
    dropped = [sorted(set(range(n)) - set(row.tolist())) for n, row in zip(batch.n_visual, keep)]
    again = [row if b != 1 else torch.cat([row, torch.tensor(dropped[1][:1])]) for b, row in enumerate(keep)]
    with pytest.raises(vlmprune.VlmpruneError, match="layer 3 keeps visual tokens of sample 1 that were dropped earlier"):
        prefill(pm.adapter, prep, vlmprune.Plan(keep={2: keep}), [_DropAndSkipLater(3, again, [4])])
    # a subset of what is present is accepted
    subset = [row[: max(1, row.numel() - 1)] for row in keep]
    out = prefill(pm.adapter, prep, vlmprune.Plan(keep={2: keep}), [_DropAndSkipLater(3, subset, [4])])
    assert out.stats.visual_tokens[:, 3].tolist() == [row.numel() for row in subset]
