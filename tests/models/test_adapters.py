"""Adapters: family detection, visual positions from input_ids, Qwen mRoPE inputs, score rows."""

import pytest
import torch
import transformers

import vlmprune
from conftest import FAMILIES, IMAGE_TOKEN, TEXT, make_batch
from vlmprune.engine.runner import prefill


def test_unsupported_model_lists_supported_classes():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    with pytest.raises(vlmprune.VlmpruneError, match="LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        vlmprune.wrap(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_positions_come_from_input_ids(tiny_models, family):
    """The image may sit anywhere: two samples with different offsets number their visual tokens alike."""
    model = tiny_models(family)
    batch = make_batch(family, model, [1, 9], [9, 1], "left")
    prep = vlmprune.wrap(model).prepare(**batch.kwargs())
    assert prep.n_visual == batch.n_visual
    assert torch.equal(prep.visual_mask, batch.input_ids == IMAGE_TOKEN)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_are_3d_mrope_and_token_types_checked(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3], [4], "left")
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**batch.kwargs())
    assert prep.position_ids.shape[0] == 3
    # visual tokens get distinct height/width positions; text continues past the image's extent
    vis = prep.visual_mask[0]
    assert prep.position_ids[1, 0, vis].unique().numel() > 1
    assert not torch.equal(prep.position_ids[1, 0], prep.position_ids[2, 0])
    ref, _ = model.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=(batch.input_ids == IMAGE_TOKEN).int(),
        image_grid_thw=batch.vision["image_grid_thw"], attention_mask=batch.attention_mask,
    )
    assert torch.equal(prep.position_ids, ref)
    wrong = torch.zeros_like(batch.input_ids)
    with pytest.raises(vlmprune.VlmpruneError, match="mm_token_type_ids disagrees"):
        pm.prepare(**batch.kwargs(), mm_token_type_ids=wrong)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_placeholder_count_must_match_features(tiny_models, family):
    model = tiny_models(family)
    batch = make_batch(family, model, [3], [4], "left")
    pm = vlmprune.wrap(model)
    ids = batch.input_ids.clone()
    ids[0, ids[0].tolist().index(IMAGE_TOKEN)] = 5  # one placeholder fewer
    with pytest.raises(vlmprune.VlmpruneError, match="visual tokens but the prompt has"):
        pm.prepare(input_ids=ids, attention_mask=batch.attention_mask, **batch.vision)
    with pytest.raises(vlmprune.VlmpruneError, match="no image was given"):
        pm.prepare(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with pytest.raises(vlmprune.VlmpruneError, match="unexpected inputs"):
        pm.prepare(**batch.kwargs(), pixel_values_videos=torch.zeros(1))


class RecordingPolicy:
    """Keeps the top-k visual tokens by the last token's head-mean attention, and records the rows."""

    def __init__(self, layer: int, k: int):
        self.layers = (layer,)
        self.k = k
        self.rows = None

    def select(self, layer, view):
        self.rows = view.attention_rows(view.last_token_index())  # (B, H, 1, L)
        scores = view.visual_scores(self.rows.mean(1)[:, 0])
        return scores.topk(self.k, dim=-1).indices


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_equal_eager_attention_maps(tiny_models, family):
    """Cheap score rows under sdpa equal the rows of the full eager attention map (brute force)."""
    eager = tiny_models(family, "eager")
    model = tiny_models(family)  # same weights, sdpa
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    with torch.no_grad():
        maps = eager(**batch.hf_kwargs(family), output_attentions=True).attentions
    pm = vlmprune.wrap(model)
    policy = RecordingPolicy(layer=2, k=5)
    prep = pm.prepare(**batch.kwargs())
    res = prefill(pm.adapter, prep, vlmprune.Plan(), [policy])
    expected_rows = maps[1][:, :, -1:, :]  # layer K-1 = 1, last token (left padding)
    torch.testing.assert_close(policy.rows, expected_rows.float(), atol=1e-5, rtol=0)
    visual = batch.input_ids == IMAGE_TOKEN
    for b in range(3):
        brute = maps[1][b, :, -1].mean(0)[visual[b]].topk(5).indices.sort().values
        assert torch.equal(res.stats.plan.keep[2][b], brute)
