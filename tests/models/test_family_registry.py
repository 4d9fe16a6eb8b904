"""The model-family registry: a family registered from outside the package is found by loading, flops
and calibration; duplicates and unknown types are refused clearly; every registered entry is complete."""

import pytest
import torch
import transformers

import vlmprune
from conftest import CLIP, IMAGE_TOKEN, TEXT, build_model, make_batch
from vlmprune.models import FAMILIES, LlavaAdapter, family, register_family, supported
from vlmprune.processors import video_processor_class
from vlmprune.weights.calibrate import find_stacks


# ----------------------------------------------------------------------------- a family defined here
class ForkConfig(transformers.LlavaConfig):
    """A LLaVA-1.5 fork under its own model_type, as a third party's model would be."""

    model_type = "test_llava_fork"


class ForkForConditionalGeneration(transformers.LlavaForConditionalGeneration):
    config_class = ForkConfig


class ForkAdapter(LlavaAdapter):
    model_type = "test_llava_fork"
    model_class = ForkForConditionalGeneration
    label = "LLaVA fork"


@pytest.fixture
def fork_family():
    transformers.AutoConfig.register(ForkConfig.model_type, ForkConfig, exist_ok=True)
    register_family(ForkAdapter)
    yield ForkAdapter
    FAMILIES.pop(ForkAdapter.model_type)


def fork_and_reference():
    """A fork model and a stock LLaVA-1.5 with the same weights."""
    torch.manual_seed(0)
    cfg = dict(vision_config=transformers.CLIPVisionConfig(**CLIP), text_config=transformers.LlamaConfig(**TEXT),
               image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    fork = ForkForConditionalGeneration(ForkConfig(**cfg)).eval()
    stock = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**cfg)).eval()
    stock.load_state_dict(fork.state_dict())
    return fork, stock


def test_a_family_registered_outside_the_package_is_found_everywhere(fork_family, tmp_path):
    fork, stock = fork_and_reference()
    fork.save_pretrained(tmp_path / "fork")
    pm = vlmprune.load(tmp_path / "fork", dtype="float32")  # loading: the registry's transformers class
    assert type(pm.model) is ForkForConditionalGeneration and type(pm.adapter) is ForkAdapter
    ref = vlmprune.wrap(stock)
    batch = make_batch("llava", stock, [3, 5], [4, 2])
    out, expected = pm(**batch.kwargs()), ref(**batch.kwargs())
    torch.testing.assert_close(out.logits, expected.logits)
    # flops: priced by the fork's inherited vision cost, equal to the stock family's
    priced = vlmprune.flops(pm, out.stats, **batch.vision)
    assert priced.vision_tower.min() > 0
    assert priced.to_dict() == vlmprune.flops(ref, expected.stats, **batch.vision).to_dict()
    # calibration: the fork's vision blocks come first
    stacks = find_stacks(pm.model)
    assert [s.name for s in stacks] == ["vision", "language"]
    assert stacks[0].path == ForkAdapter.vision_blocks and stacks[0].blocks is pm.model.model.vision_tower.encoder.layers
    # messages list it, from the registry
    assert "ForkForConditionalGeneration (LLaVA fork)" in supported()
    with pytest.raises(vlmprune.VlmpruneError, match=r"LLaVA fork's visual tokens.*fixed resolution"):
        pm(**batch.kwargs(), prune=vlmprune.methods.Downsample(keep=0.5))


def test_duplicate_and_incomplete_families_are_refused(fork_family):
    class Again(LlavaAdapter):
        label = "again"  # model_type "llava", inherited

    with pytest.raises(vlmprune.VlmpruneError, match="'llava' is already registered by LlavaAdapter"):
        register_family(Again)
    with pytest.raises(vlmprune.VlmpruneError, match="'test_llava_fork' is already registered by ForkAdapter"):
        register_family(ForkAdapter)

    class Bare(vlmprune.models.Adapter):
        model_type = "bare"

    with pytest.raises(vlmprune.VlmpruneError, match="does not set model_class, label, vision_blocks, vision_cost, prepare"):
        register_family(Bare)
    with pytest.raises(vlmprune.VlmpruneError, match="takes an Adapter subclass"):
        register_family(object)
    assert "bare" not in FAMILIES and FAMILIES["llava"] is LlavaAdapter


def test_unknown_model_types_list_the_registered_families(fork_family):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    with pytest.raises(vlmprune.VlmpruneError) as wrapped:
        vlmprune.wrap(model)
    with pytest.raises(vlmprune.VlmpruneError) as looked_up:
        family("llama")
    for err in (wrapped, looked_up):
        message = str(err.value)
        assert "'llama'" in message and "is not supported" in message
        for entry in FAMILIES.values():
            assert f"{entry.class_name()} ({entry.label})" in message
    with pytest.raises(vlmprune.VlmpruneError, match="supported family.*test_llava_fork"):
        vlmprune.flops(model, vlmprune.Plan())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_registered_family_is_complete(model_type):
    """A new family needs a tiny builder in conftest.build_model to pass this."""
    entry = FAMILIES[model_type]
    assert entry.model_type == model_type and entry.label
    cls = entry.transformers_class()
    assert getattr(transformers, entry.class_name()) is cls
    model = build_model(model_type)
    assert type(model) is cls and model.config.model_type == model_type
    assert type(vlmprune.wrap(model).adapter) is entry
    blocks = model.get_submodule(entry.vision_blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0
    batch = make_batch(model_type, model, [3, 5], [4, 2])
    calls = []  # the path names the blocks the vision pass runs, each once
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(blocks)]
    with torch.no_grad():
        vlmprune.wrap(model).adapter.prepare(**batch.kwargs())
    for handle in handles:
        handle.remove()
    assert calls == list(range(len(blocks)))
    images = entry.vision_cost.images(model.config, batch.n_visual, **batch.vision)
    assert sum(tokens for tokens, _, _ in images) == sum(batch.n_visual) and all(t > 0 and p > 0 for _, t, p in images)
    scores = entry.vision_cost.score_rows(model.config, images, batch.vision.get("image_grid_thw"))
    assert [tokens for tokens, _ in scores] == [tokens for tokens, _, _ in images]
    if entry.processor_class is not None:
        assert isinstance(getattr(transformers, entry.processor_class), type)
    assert video_processor_class(model_type) == entry.processor_class
    assert not (entry.downsample and entry.fixed_resolution)


def test_the_built_in_families_and_their_processors():
    assert list(FAMILIES) == ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
    assert {t: video_processor_class(t) for t in (*FAMILIES, "llama")} == {
        "llava": None, "llava_next": None, "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "llama": None,
    }
    assert [t for t, e in FAMILIES.items() if e.downsample] == ["llava_next", "qwen2_vl", "qwen2_5_vl"]
