"""With no pruning the engine is the unmodified transformers model: logits and greedy generations."""

import pytest
import torch

import vlmprune
from conftest import FAMILIES, make_batch, sample_inputs

SHAPES = {"batch1": ([4], [5], "left"), "batch3-left": ([3, 6, 1], [4, 2, 7], "left"), "batch3-right": ([3, 6, 1], [4, 2, 7], "right")}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(tiny_models, family, shape):
    model = tiny_models(family)
    batch = make_batch(family, model, *SHAPES[shape])
    pm = vlmprune.wrap(model)
    with torch.no_grad():
        ref = model(**batch.hf_kwargs(family)).logits
    valid = batch.attention_mask.bool()
    for prune in (None, vlmprune.Plan()):
        out = pm(**batch.kwargs(), prune=prune)
        assert out.logits.shape == ref.shape
        assert torch.equal(out.token_index[valid], torch.arange(valid.shape[1]).expand_as(valid)[valid])
        torch.testing.assert_close(out.logits[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_backend_equals_transformers(tiny_models, family):
    model = tiny_models(family, "eager")
    batch = make_batch(family, model, *SHAPES["batch3-left"])
    with torch.no_grad():
        ref = model(**batch.hf_kwargs(family)).logits
    out = vlmprune.wrap(model)(**batch.kwargs())
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", ["batch1", "batch3-left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(tiny_models, family, shape):
    model = tiny_models(family)
    batch = make_batch(family, model, *SHAPES[shape])
    kw = batch.hf_kwargs(family)
    kw.pop("position_ids", None)  # generate derives positions from the mask itself
    ref = model.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = vlmprune.wrap(model).generate(**batch.kwargs(), max_new_tokens=8, eos_token_id=())
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_sample_alone(tiny_models, family, side):
    """Ragged per-sample plans in a padded batch give each sample what it gets alone."""
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], side)
    pm = vlmprune.wrap(model)
    gen = torch.Generator().manual_seed(1)
    keep = [torch.randperm(n, generator=gen)[: max(1, n // (b + 2))] for b, n in enumerate(batch.n_visual)]
    skip = [[1], [], [1, 4]]
    plan = vlmprune.Plan(keep={2: keep}, skip=skip)
    out = pm.generate(**batch.kwargs(), prune=plan, max_new_tokens=6, eos_token_id=(), return_dict=True)
    for b in range(3):
        alone = sample_inputs(family, batch, b)
        solo_plan = vlmprune.Plan(keep={2: [keep[b]]}, skip=[skip[b]])
        solo = pm.generate(**alone.kwargs(), prune=solo_plan, max_new_tokens=6, eos_token_id=(), return_dict=True)
        assert torch.equal(out.sequences[b, -6:], solo.sequences[0, -6:])
        for step_batch, step_solo in zip(out.scores, solo.scores):
            torch.testing.assert_close(step_batch[b], step_solo[0], atol=1e-4, rtol=0)
        assert torch.equal(out.stats.kv_entries[b], solo.stats.kv_entries[0])


def test_eos_stops_and_pads_like_transformers(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, *SHAPES["batch3-left"])
    pm = vlmprune.wrap(model)
    free = pm.generate(**batch.kwargs(), max_new_tokens=8, eos_token_id=())
    eos = int(free[0, -6])  # sample 0's third generated token: it must stop there
    ref = model.generate(**batch.kwargs(), max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ours = pm.generate(**batch.kwargs(), max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, ref)
    assert int(ours[0, -5]) == 0  # padded after eos


def test_eos_default_is_the_generation_configs_and_empty_stops_at_none(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, *SHAPES["batch3-left"])
    pm = vlmprune.wrap(model)
    free = pm.generate(**batch.kwargs(), max_new_tokens=8, eos_token_id=())
    eos = int(free[0, -6])
    model.generation_config.eos_token_id = eos
    try:
        ref = model.generate(**batch.kwargs(), max_new_tokens=8, do_sample=False, pad_token_id=0)  # the config's eos
        assert not torch.equal(ref[:, -8:], free[:, -8:])
        assert torch.equal(pm.generate(**batch.kwargs(), max_new_tokens=8, pad_token_id=0), ref)
        assert pm.eos_ids() == [eos] and pm.eos_ids(()) == [] and pm.eos_ids([eos, 10**9]) == [eos]
        assert torch.equal(pm.generate(**batch.kwargs(), max_new_tokens=8, eos_token_id=()), free)
    finally:
        model.generation_config.eos_token_id = None
    assert pm.eos_ids() == []


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_models):
    model = tiny_models("qwen2_vl")
    batch = make_batch("qwen2_vl", model, *SHAPES["batch3-left"])
    pm = vlmprune.wrap(model)
    kw = dict(**batch.kwargs(), max_new_tokens=6, eos_token_id=())
    greedy = pm.generate(**kw)
    assert torch.equal(pm.generate(**kw, do_sample=True, top_p=1e-6, seed=3), greedy)
    a = pm.generate(**kw, do_sample=True, temperature=5.0, seed=7)
    b = pm.generate(**kw, do_sample=True, temperature=5.0, seed=7)
    c = pm.generate(**kw, do_sample=True, temperature=5.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_request_beyond_the_position_range_is_refused(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4])
    with pytest.raises(vlmprune.VlmpruneError, match="exceeds the model's 1024 positions"):
        vlmprune.wrap(model).generate(**batch.kwargs(), max_new_tokens=5000)
    with pytest.raises(vlmprune.VlmpruneError, match="top_p must be in"):
        vlmprune.wrap(model).generate(**batch.kwargs(), do_sample=True, top_p=1.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reserved_cache_decodes_in_place_with_the_same_logits(tiny_models, family):
    """After `reserve`, decode steps write into the preallocated buffers (the storage never moves:
    nothing cached is copied again) and give the logits of the growing (concatenating) cache; past the
    reserved room the cache grows as before."""
    from vlmprune.engine.runner import decode_step, prefill

    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6], [4, 2], "left")  # padded: the decode mask is in play
    pm = vlmprune.wrap(model)
    plan = vlmprune.Plan(keep={2: [torch.arange(0, n, 2) for n in batch.n_visual]}, skip=[4])
    runs = []
    for room in (0, 3):
        prep = pm.prepare(**batch.kwargs())
        res = prefill(pm.adapter, prep, plan, logits_to_keep=1)
        res.cache.reserve(room)
        where = {i: k.untyped_storage().data_ptr() for i, k in enumerate(res.cache.keys) if k is not None}
        token, positions, steps = res.last_logits.argmax(-1), res.next_position.clone(), []
        for _ in range(5):  # 3 in the reserved room, then 2 beyond it
            logits = decode_step(pm.adapter, res.cache, token, positions)
            steps.append(logits)
            token, positions = logits.argmax(-1), positions + 1
            if room and len(steps) <= room:
                assert all(res.cache.keys[i].untyped_storage().data_ptr() == p for i, p in where.items())
        assert res.cache.keys[4] is None and all(v.shape[1] == res.cache.keys[i].shape[2]
                                                 for i, v in enumerate(res.cache.key_valid) if v is not None)
        runs.append(steps)
    for grown, reserved in zip(*runs):
        torch.testing.assert_close(reserved, grown, atol=1e-5, rtol=0)
