"""Layer methods: ShortGPT's Block Influence from its definition, random layers, composition."""

import pytest
import torch

import vlmprune
from conftest import make_batch


def _bi_brute_force(model, family, batches):
    """BI_i = 1 - mean cos(input_i, output_i) over real tokens, captured with hooks on the unmodified model."""
    layers = model.model.language_model.layers
    sums, counts = torch.zeros(len(layers), dtype=torch.float64), torch.zeros(len(layers), dtype=torch.float64)
    for batch in batches:
        seen = {}
        hooks = [
            layer.register_forward_hook(lambda m, a, k, out, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"], out)), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        try:
            with torch.no_grad():
                model(**batch.hf_kwargs(family))
        finally:
            for h in hooks:
                h.remove()
        valid = batch.attention_mask.bool()
        for i, (x, y) in seen.items():
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            sums[i] += float(cos[valid].sum())
            counts[i] += float(valid.sum())
    return 1 - sums / counts


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_shortgpt_block_influence_and_choice(tiny_models, family):
    model = tiny_models(family)
    batches = [make_batch(family, model, [3, 6], [4, 2], "left", seed=s) for s in range(2)]
    pm = vlmprune.wrap(model)
    method = vlmprune.ShortGPT(keep_layers=4).calibrate(pm, [b.kwargs() for b in batches])
    brute = _bi_brute_force(model, family, batches)
    torch.testing.assert_close(torch.tensor(method.scores, dtype=torch.float64), brute, atol=1e-5, rtol=0)
    expected_skip = sorted(torch.argsort(brute)[:2].tolist())
    out = pm(**batches[0].kwargs(), prune=method)
    assert sorted(out.stats.plan.skip.layers) == expected_skip
    assert out.stats.layers_run.sum(1).tolist() == [4, 4]


def test_layer_method_errors(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4])
    pm = vlmprune.wrap(model)
    with pytest.raises(vlmprune.VlmpruneError, match="needs calibration data"):
        pm(**batch.kwargs(), prune=vlmprune.ShortGPT(keep_layers=3))
    with pytest.raises(vlmprune.VlmpruneError, match="keep_layers=9 but the model has 6"):
        pm(**batch.kwargs(), prune=vlmprune.RandomLayers(keep_layers=9))
    with pytest.raises(vlmprune.VlmpruneError, match="a layer count must be >= 1"):
        vlmprune.ShortGPT(keep_layers=0)


def test_compose_token_and_layer_methods(tiny_models):
    model = tiny_models("llava_next")
    batch = make_batch("llava_next", model, [3, 6], [4, 2], "left")
    pm = vlmprune.wrap(model)
    out = pm(**batch.kwargs(), prune=[vlmprune.FastV(layer=2, keep=0.25), vlmprune.RandomLayers(keep_layers=4, seed=1)])
    assert 2 in out.stats.plan.keep and len(out.stats.plan.skip.layers) == 2
    assert out.stats.layers_run.sum(1).tolist() == [4, 4]
    with pytest.raises(vlmprune.VlmpruneError, match="two token decisions at layer 2"):
        pm(**batch.kwargs(), prune=vlmprune.Compose(vlmprune.FastV(layer=2), vlmprune.FastV(layer=2, keep=0.5)))


def test_compose_refuses_two_plans_at_one_layer(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4])
    with pytest.raises(vlmprune.VlmpruneError, match="two methods drop tokens at layer 1"):
        vlmprune.wrap(model)(**batch.kwargs(), prune=[vlmprune.Random(layer=1), vlmprune.Pool(layer=1)])
