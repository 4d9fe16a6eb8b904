"""Tiny random-weight models of the four supported families, and padded batches for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
VOCAB = 256
IMAGE_TOKEN = 250

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=1024,
    initializer_range=0.1,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=28, patch_size=7, num_channels=3, projection_dim=32,
)
QWEN_VISION = dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
MROPE = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)


def build_model(family: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    if family == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**CLIP), text_config=transformers.LlamaConfig(**TEXT),
            image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
        )
        cls = transformers.LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**CLIP), text_config=transformers.LlamaConfig(**TEXT),
            image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        )
        cls = transformers.LlavaNextForConditionalGeneration
    elif family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, **QWEN_VISION),
            text_config=dict(TEXT, rope_parameters=MROPE),
            image_token_id=IMAGE_TOKEN, video_token_id=251, vision_start_token_id=252,
        )
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4,
                               fullatt_block_indexes=[1], window_size=56, **QWEN_VISION),
            text_config=dict(TEXT, rope_parameters=MROPE),
            image_token_id=IMAGE_TOKEN, video_token_id=251, vision_start_token_id=252,
        )
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn_implementation
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict = field(default_factory=dict)
    n_visual: list[int] = field(default_factory=list)

    def kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, **self.vision)

    def hf_kwargs(self, family: str) -> dict:
        """Inputs for the unmodified transformers model, positions from the mask as generate uses them."""
        kw = self.kwargs()
        if family.startswith("qwen"):
            types = (self.input_ids == IMAGE_TOKEN).int()
            kw["mm_token_type_ids"] = types
        else:
            kw["position_ids"] = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kw


def _image_inputs(family: str, model, n_images: int, gen: torch.Generator):
    """Pixel inputs for `n_images` images of different sizes, and each image's visual-token count."""
    if family == "llava":
        pix = torch.randn(n_images, 3, 28, 28, generator=gen)
        return {"pixel_values": pix}, [16] * n_images
    if family == "llava_next":
        sizes = torch.tensor([[30, 50], [56, 56], [50, 28]][:n_images] + [[40, 40]] * max(0, n_images - 3))
        pix = torch.randn(n_images, 5, 3, 28, 28, generator=gen)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pix, image_sizes=sizes, return_dict=True).pooler_output
        return {"pixel_values": pix, "image_sizes": sizes}, [f.shape[0] for f in feats]
    grids = [[1, 8, 8], [1, 8, 12], [1, 12, 8]]
    grid = torch.tensor([grids[i % 3] for i in range(n_images)])
    patches = int(grid.prod(-1).sum())
    pix = torch.randn(patches, 3 * 2 * 14 * 14, generator=gen)
    return {"pixel_values": pix, "image_grid_thw": grid}, (grid.prod(-1) // 4).tolist()


def make_batch(family: str, model, prefix: list[int], suffix: list[int], padding_side: str = "left", seed: int = 0) -> Batch:
    """One image per sample: [bos, prefix text, image placeholders, suffix text], padded to one length."""
    gen = torch.Generator().manual_seed(seed)
    vision, n_visual = _image_inputs(family, model, len(prefix), gen)
    rows = []
    for p, s, n in zip(prefix, suffix, n_visual):
        text = lambda k: torch.randint(3, 200, (k,), generator=gen).tolist()
        rows.append([2] + text(p) + [IMAGE_TOKEN] * n + text(s))
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[b, sl] = torch.tensor(row)
        mask[b, sl] = 1
    return Batch(ids, mask, vision, n_visual)


def sample_inputs(family: str, batch: Batch, b: int) -> Batch:
    """Sample `b` of a batch, alone and unpadded."""
    keep = batch.attention_mask[b].bool()
    vision = {}
    if family == "llava":
        vision = {"pixel_values": batch.vision["pixel_values"][b : b + 1]}
    elif family == "llava_next":
        vision = {k: v[b : b + 1] for k, v in batch.vision.items()}
    else:
        grid = batch.vision["image_grid_thw"]
        counts = grid.prod(-1).tolist()
        start = sum(counts[:b])
        vision = {"pixel_values": batch.vision["pixel_values"][start : start + counts[b]], "image_grid_thw": grid[b : b + 1]}
    return Batch(batch.input_ids[b : b + 1, keep], batch.attention_mask[b : b + 1, keep], vision, [batch.n_visual[b]])


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = build_model(family, attn)
        return cache[family, attn]

    return get


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local checkpoint of the testbed recipe with random weights (one per test module, which may
    change it)."""
    from vlmprune.testbed.recipe import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", seed=1)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An 84 x 84 grey-level PNG of noise, the testbed's image size."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((84, 84)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="session")
def user_checkpoints(tmp_path_factory):
    """family -> directory of a tiny random-weight checkpoint saved like a user's (weights, processor, chat
    template), for all four families; see tests/checkpoints.py."""
    from checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("user_checkpoints")
    return {family: save_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def photo_jsonl(tmp_path_factory):
    """data.jsonl of six real photographs ({"image": "images/NAME.jpg", "prompt", "answer"}); see tests/checkpoints.py."""
    from checkpoints import photo_dataset

    return photo_dataset(tmp_path_factory.mktemp("photos"))
