"""Tiny random-weight checkpoints of the four supported families, saved to disk like a user's checkpoint
(safetensors weights, a real processor, a tokenizer and the family's chat template), and a JSONL of real
photographs from scikit-image's bundled samples.

    save_checkpoint("qwen2_vl", tmp / "qwen")   # -> the directory; vlmprune.load(it).processor is set
    photo_dataset(tmp / "photos", n=6)          # -> tmp/photos/data.jsonl, images in tmp/photos/images/

The tokenizer is a byte-level BPE trained offline on CPython's `pydoc_data.topics` (cached per process),
with the family's special tokens added after the trained vocabulary as in the real checkpoints. The model
sizes are those of `conftest.build_model`; only the vocabulary and the special-token ids differ.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch
import transformers

from conftest import CLIP, FAMILIES, MROPE, QWEN_VISION, TEXT

BPE_VOCAB = 800  # trained tokens (bytes + merges), before the family's special tokens

# LLaVA (Llama tokenizer): <unk> <s> </s> first, then the vocabulary, then <image> and <pad> (as llava-hf).
LLAVA_HEAD = ["<unk>", "<s>", "</s>"]
LLAVA_TAIL = ["<image>", "<pad>"]
# Qwen2(.5)-VL: all special tokens after the vocabulary, in the real checkpoints' order.
QWEN_TAIL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The templates of llava-hf/llava-1.5-7b-hf (also llava-v1.6-vicuna) and Qwen/Qwen2-VL-7B-Instruct (= 2.5-VL).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
# Qwen: 28 px per visual token side (patch 14, merge 2); a photo gets 32 to 64 visual tokens (a 128 px one
# is resized up to about 32 tokens' worth of pixels).
QWEN_MIN_PIXELS = 28 * 28 * 32
QWEN_MAX_PIXELS = 28 * 28 * 64


def _qwen_processors_without_torchvision() -> None:
    """Let the real Qwen2-VL / Qwen2.5-VL processor classes work on images and text without torchvision.

    transformers 5.23 builds every video processor on torchvision; without it, ``Qwen2VLProcessor(...)`` fails
    even with ``video_processor=None`` (the sub-processor type check looks up ``VideoProcessorMixin``, which
    is then not exported) and ``AutoProcessor.from_pretrained`` fails loading the video processor. Here the
    two classes drop their video sub-processor (``video_processor`` reads None); image and text processing
    are untouched. Nothing changes where torchvision is installed.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    for cls in (transformers.Qwen2VLProcessor, transformers.Qwen2_5_VLProcessor):
        if "get_attributes" in cls.__dict__:
            continue
        cls.get_attributes = classmethod(lambda c: ["image_processor", "tokenizer"])
        cls.video_processor = None


_qwen_processors_without_torchvision()


@functools.lru_cache(maxsize=None)
def _bpe_json(head: tuple[str, ...]) -> str:
    """A byte-level BPE trained on the text of CPython's pydoc topics (about 0.2 s), as tokenizer JSON;
    the `head` special tokens take the first ids."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB + len(head), special_tokens=list(head),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return tok.to_str()


def build_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """The family's tokenizer: LLaVA's adds <s> in front like the Llama tokenizer; Qwen's adds nothing."""
    from tokenizers import Tokenizer, processors

    llava = family.startswith("llava")
    tok = Tokenizer.from_str(_bpe_json(tuple(LLAVA_HEAD) if llava else ()))
    if llava:
        tok.add_special_tokens(LLAVA_TAIL)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"}, padding_side="left", chat_template=LLAVA_TEMPLATE,
            model_max_length=TEXT["max_position_embeddings"],
        )
    tok.add_special_tokens(QWEN_TAIL)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_TAIL if t not in ("<|im_end|>", "<|endoftext|>")],
        padding_side="left", chat_template=QWEN_TEMPLATE, model_max_length=TEXT["max_position_embeddings"],
    )


def build_processor(family: str, tokenizer):
    """The family's real processor class, sized to conftest's vision towers, with the chat template."""
    if family == "llava":
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": CLIP["image_size"]},
            crop_size={"height": CLIP["image_size"], "width": CLIP["image_size"]},
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )
        return transformers.LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=CLIP["patch_size"],
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
        )
    if family == "llava_next":
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": CLIP["image_size"]},
            crop_size={"height": CLIP["image_size"], "width": CLIP["image_size"]},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )
        return transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=CLIP["patch_size"],
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
        )
    image_processor = transformers.Qwen2VLImageProcessor(
        min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_VISION["patch_size"],
        temporal_patch_size=QWEN_VISION["temporal_patch_size"], merge_size=QWEN_VISION["spatial_merge_size"],
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    cls = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    # no video processor where torchvision is missing (see _qwen_processors_without_torchvision)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def build_model(family: str, tokenizer, seed: int = 0):
    """conftest's tiny model, with the vocabulary and special-token ids of `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = -(-len(tokenizer) // 64) * 64  # rounded up, as real checkpoints pad the embedding matrix
    torch.manual_seed(seed)
    if family.startswith("llava"):
        text = transformers.LlamaConfig(
            **dict(TEXT, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
        )
        common = dict(
            vision_config=transformers.CLIPVisionConfig(**CLIP), text_config=text, image_token_id=ids("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        )
        if family == "llava":
            patches = (CLIP["image_size"] // CLIP["patch_size"]) ** 2
            cfg = transformers.LlavaConfig(**common, image_seq_length=patches)
            cls = transformers.LlavaForConditionalGeneration
        else:
            cfg = transformers.LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
            cls = transformers.LlavaNextForConditionalGeneration
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    else:
        eos = [ids("<|im_end|>"), ids("<|endoftext|>")]  # as Qwen2-VL-Instruct's generation config
        pad = tokenizer.pad_token_id
        text = dict(TEXT, vocab_size=vocab, rope_parameters=MROPE, pad_token_id=pad, eos_token_id=eos[0],
                    bos_token_id=ids("<|endoftext|>"))
        tokens = dict(
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )
        if family == "qwen2_vl":
            cfg = transformers.Qwen2VLConfig(
                vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, **QWEN_VISION),
                text_config=text, **tokens,
            )
            cls = transformers.Qwen2VLForConditionalGeneration
        else:
            cfg = transformers.Qwen2_5_VLConfig(
                vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4,
                                   fullatt_block_indexes=[1], window_size=56, **QWEN_VISION),
                text_config=text, **tokens,
            )
            cls = transformers.Qwen2_5_VLForConditionalGeneration
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if family.startswith("llava"):
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_checkpoint(family: str, directory, seed: int = 0) -> Path:
    """Save a tiny random-weight `family` checkpoint (safetensors, processor, tokenizer, chat template)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    build_model(family, tokenizer, seed).save_pretrained(out, safe_serialization=True)
    processor = build_processor(family, tokenizer)
    processor.save_pretrained(out)
    if family.startswith("qwen") and getattr(processor, "video_processor", None) is None:
        # what transformers writes with torchvision installed, so that such an environment loads it too
        config_file = out / "processor_config.json"
        config = json.loads(config_file.read_text())
        image = config["image_processor"]
        config["video_processor"] = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            **{k: image[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                     "image_std", "resample", "do_convert_rgb", "do_normalize", "do_rescale",
                                     "do_resize", "rescale_factor")},
        }
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# name, skimage loader, file suffix, question, short answer
PHOTOS = [
    ("astronaut", "astronaut", ".jpg", "What is the person in the photo wearing?", "a spacesuit"),
    ("coffee", "coffee", ".jpg", "What is in the cup?", "coffee"),
    ("chelsea", "chelsea", ".png", "What animal is this?", "a cat"),
    ("rocket", "rocket", ".jpg", "What is standing on the launch pad?", "a rocket"),
    ("motorcycle", "stereo_motorcycle", ".jpg", "What vehicle is shown?", "a motorcycle"),
    ("hubble", "hubble_deep_field", ".png", "What does this picture of the sky show?", "galaxies"),
    ("retina", "retina", ".jpg", "What part of the body is this?", "the retina of an eye"),
    ("tissue", "immunohistochemistry", ".jpg", "What kind of image is this?", "stained tissue under a microscope"),
]
PHOTO_SIDE = 128  # longest side after downscaling


def photo(name: str):
    """One of PHOTOS as an RGB PIL image, longest side PHOTO_SIDE."""
    import skimage.data
    from PIL import Image

    loader = {p[0]: p[1] for p in PHOTOS}[name]
    array = getattr(skimage.data, loader)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    img = Image.fromarray(array).convert("RGB")
    img.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
    return img


def photo_dataset(directory, n: int = 6) -> Path:
    """Write `n` real photographs to directory/images/ and directory/data.jsonl (paths relative to it)."""
    if not 1 <= n <= len(PHOTOS):
        raise ValueError(f"n must be in 1..{len(PHOTOS)}, got {n}")
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, _, suffix, prompt, answer in PHOTOS[:n]:
        rel = f"images/{name}{suffix}"
        photo(name).save(root / rel, **({"quality": 90} if suffix == ".jpg" else {}))
        rows.append({"image": rel, "prompt": prompt, "answer": answer})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
