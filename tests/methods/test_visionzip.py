"""VisionZip: the adapter's vision scores equal eager attention maps of the vision tower, the decision
equals a brute-force selection from them, and the pruned forward equals the merged sequence by hand."""

import sys

import pytest
import torch

import vlmprune
from conftest import FAMILIES, make_batch
from vlmprune.methods.registry import configure


def _batch(tiny_models, family):
    model = tiny_models(family)
    return model, make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")


class _Hooks:
    """Forward hooks on an eager model, removed on exit."""

    def __init__(self):
        self.handles = []

    def add(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _tag_rows(n_rows, width):
    """Rows whose channel 0 is 1..n_rows (exact in float32) and the rest 0: follows rows through a layout."""
    tags = torch.zeros(n_rows, width)
    tags[:, 0] = torch.arange(1, n_rows + 1, dtype=torch.float32)
    return tags


def _reference_clip(eager, batch):
    """Per visual token of the batch (in order): CLS attention (eager map, head mean) in the layer whose
    output is the selected hidden state, that layer's head-mean keys, and whether the token has a patch.
    The token -> (tile, patch) layout comes from tags pushed through the model's own projector output."""
    inner, tower = eager.model, eager.model.vision_tower
    layer_out, k_out, tags = {}, {}, {}
    with _Hooks() as hooks:
        for i, layer in enumerate(tower.encoder.layers):
            hooks.add(layer, lambda m, a, o, i=i: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
            hooks.add(layer.self_attn.k_proj, lambda m, a, o, i=i: k_out.__setitem__(i, o))

        def tag_projector(module, args, out):
            tiles, patches, width = out.shape
            tags["patches"] = patches
            return _tag_rows(tiles * patches, width).view(tiles, patches, width)

        hooks.add(inner.multi_modal_projector, tag_projector)
        with torch.no_grad():
            out = inner.get_image_features(
                **batch.vision, output_attentions=True, output_hidden_states=True, return_dict=True
            )
    selected = out.hidden_states[eager.config.vision_feature_layer]
    layer = next(i for i, h in layer_out.items() if torch.equal(h, selected))
    cls_attn = out.attentions[layer][:, :, 0].mean(1)  # (T, S): CLS row, head mean
    tiles, seq, width = k_out[layer].shape
    heads = eager.config.vision_config.num_attention_heads
    keys = k_out[layer].view(tiles, seq, heads, -1).mean(2)  # (T, S, d)
    rows = torch.cat(list(out.pooler_output), 0)
    newline = getattr(inner, "image_newline", None)
    patch = torch.ones(rows.shape[0], dtype=torch.bool)
    if newline is not None:
        patch = ~torch.isclose(rows, newline[None]).all(1)
    flat = rows[:, 0].round().long() - 1  # tile * P + patch index after the CLS token is dropped
    tile, col = flat // tags["patches"], flat % tags["patches"] + 1
    dominance = torch.where(patch, cls_attn[tile.clamp(min=0), col.clamp(min=0)], 0.0)
    keys = torch.where(patch[:, None], keys[tile.clamp(min=0), col.clamp(min=0)], 0.0)
    return dominance, keys, patch


def _reference_qwen(eager, batch, monkeypatch):
    """Per visual token: the mean attention each patch receives in the last vision block (eager weights of
    every attention segment, mean over heads and queries), head-mean keys before RoPE, each averaged over
    the patches merged into the token; the token -> merge-unit layout comes from tags through the merger."""
    visual = eager.model.visual
    module = sys.modules[type(visual.blocks[-1].attn).__module__]
    original, weights, state, qkv = module.eager_attention_forward, [], {"on": False}, {}

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        if state["on"]:
            weights.append(w)
        return out, w

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    last = visual.blocks[-1]
    with _Hooks() as hooks:
        pre = last.register_forward_pre_hook(lambda m, a: state.__setitem__("on", True))
        hooks.handles.append(pre)
        hooks.add(last, lambda m, a, o: state.__setitem__("on", False))
        hooks.add(last.attn.qkv, lambda m, a, o: qkv.__setitem__("out", o))
        hooks.add(visual.merger, lambda m, a, o: _tag_rows(o.shape[0], o.shape[1]))
        with torch.no_grad():
            out = eager.model.get_image_features(
                batch.vision["pixel_values"], batch.vision["image_grid_thw"], return_dict=True
            )
    received = torch.cat([w[0].mean(0).mean(0) for w in weights])  # per patch in block order
    heads = last.attn.num_heads
    keys = qkv["out"].view(received.numel(), 3, heads, -1)[:, 1].mean(1)
    unit = visual.spatial_merge_size**2
    rows = torch.cat(list(out.pooler_output), 0)
    units = rows[:, 0].round().long() - 1  # each LLM token's merge unit in block order
    dominance = received.view(-1, unit).mean(1)[units]
    keys = keys.view(-1, unit, keys.shape[-1]).mean(1)[units]
    return dominance, keys, torch.ones(rows.shape[0], dtype=torch.bool)


def _reference(tiny_models, family, batch, monkeypatch):
    eager = tiny_models(family, "eager")
    values = _reference_qwen(eager, batch, monkeypatch) if family.startswith("qwen") else _reference_clip(eager, batch)
    return [v.split(batch.n_visual) for v in values]


def _brute_force(dominance, keys, patch, budget, share):
    """VisionZip from its definition, one token at a time."""
    n = dominance.numel()
    candidates = [i for i in range(n) if patch[i]]
    budget = min(budget, len(candidates))
    n_dom = min(budget, round(share * budget))
    ranked = sorted(candidates, key=lambda i: (-float(dominance[i]), i))
    dominant, rest = ranked[:n_dom], sorted(ranked[n_dom:])
    assign = [-1] * n
    for i in dominant:
        assign[i] = i
    n_ctx = budget - n_dom
    if n_ctx:
        step = max(1, len(rest) // n_ctx)
        targets = rest[::step][:n_ctx]
        unit = torch.nn.functional.normalize(keys.double(), dim=-1)
        for i in rest:
            sims = [float(unit[i] @ unit[t]) for t in targets]
            assign[i] = i if i in targets else targets[sims.index(max(sims))]
    return sorted(i for i in range(n) if assign[i] == i), assign


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_scores_equal_eager_attention_maps(tiny_models, family, monkeypatch):
    model, batch = _batch(tiny_models, family)
    prep = vlmprune.wrap(model).prepare(**batch.kwargs())
    got = prep.vision_scores()
    dominance, keys, patch = _reference(tiny_models, family, batch, monkeypatch)
    for b in range(len(batch.n_visual)):
        assert torch.equal(got.patch[b], patch[b])
        torch.testing.assert_close(got.dominance[b], dominance[b], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(got.keys[b], keys[b], atol=1e-5, rtol=1e-4)
    if family == "llava_next":
        assert not all(p.all() for p in patch)  # the newline tokens are there, and have no patch
    if family.startswith("qwen"):  # attention columns summed over many small blocks of query rows
        monkeypatch.setattr(sys.modules["vlmprune.models.qwen2_vl"], "SCORE_BLOCK", 4 * 64 * 5)
        for b, d in enumerate(prep.vision_scores().dominance):
            torch.testing.assert_close(d, got.dominance[b], atol=1e-7, rtol=1e-6)
    assert model.config.vision_config._attn_implementation == "sdpa"  # the tower was not switched to eager


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep, share", [(0.5, 0.5), (0.25, 54 / 64)])
def test_visionzip_equals_brute_force(tiny_models, family, keep, share, monkeypatch):
    model, batch = _batch(tiny_models, family)
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=vlmprune.VisionZip(keep=keep, dominant_share=share))
    plan = out.stats.plan
    for b, (dominance, keys, patch) in enumerate(zip(*_reference(tiny_models, family, batch, monkeypatch))):
        budget = max(1, round(keep * batch.n_visual[b]))
        kept, assign = _brute_force(dominance, keys, patch, budget, share)
        assert plan.keep[0][b].tolist() == kept, b
        assert plan.merge[0][b].tolist() == assign, b
        assert out.stats.visual_tokens[b, 0] == len(kept) == min(budget, int(patch.sum()))


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_forward_equals_the_merged_sequence_by_hand(tiny_models, family):
    """Dominant tokens unchanged, each contextual target the mean of its group, at its own position."""
    model = tiny_models(family)
    batch = make_batch(family, model, [3], [4], "left")
    pm = vlmprune.wrap(model)
    out = pm(**batch.kwargs(), prune=vlmprune.VisionZip(keep=0.5, dominant_share=0.5), logits_to_keep=1)
    keep, assign = out.stats.plan.keep[0][0], out.stats.plan.merge[0][0]
    assert (torch.bincount(assign[assign >= 0]) > 1).any()  # something was merged
    prep = pm.prepare(**batch.kwargs())
    embeds, pos = prep.inputs_embeds[0].clone(), prep.position_ids[:, 0]
    vis = prep.visual_mask[0].nonzero().squeeze(1)
    for t in keep:
        embeds[vis[t]] = prep.inputs_embeds[0, vis[assign == t]].mean(0)
    kept_pos = torch.ones(embeds.shape[0], dtype=torch.bool)
    kept_pos[vis] = False
    kept_pos[vis[keep]] = True
    positions = pos[:, kept_pos][:, None] if pos.shape[0] == 3 else pos[:, kept_pos]
    with torch.no_grad():
        lm = model.model.language_model(inputs_embeds=embeds[kept_pos][None], position_ids=positions)
        ref = model.lm_head(lm.last_hidden_state[:, -1])
    torch.testing.assert_close(out.last_logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_one_vision_pass_and_keep_all_is_the_unpruned_model(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    pm = vlmprune.wrap(model)
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    calls = []
    handle = tower.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out = pm(**batch.kwargs(), prune=vlmprune.VisionZip(keep=1.0))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert [r.tolist() for r in out.stats.plan.keep[0]] == [list(range(n)) for n in batch.n_visual]
    torch.testing.assert_close(out.logits, pm(**batch.kwargs()).logits, atol=1e-5, rtol=0)


def test_text_only_input_keeps_everything(tiny_models):
    model = tiny_models("llava")
    ids = torch.tensor([[2, 5, 6, 7]])
    out = vlmprune.wrap(model)(input_ids=ids, prune=vlmprune.VisionZip())
    assert out.stats.plan.is_empty


def test_visionzip_by_name_and_from_cli_options():
    assert vlmprune.build_method("visionzip", keep=0.25) == vlmprune.VisionZip(keep=0.25)
    method = configure("visionzip", keep=64, layer=None, keep_layers=None, seed=None)
    assert method == vlmprune.VisionZip(keep=64) and method.dominant_share == 54 / 64
