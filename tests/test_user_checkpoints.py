"""The tiny checkpoints saved like a user's (tests/checkpoints.py) load through `vlmprune.load` with their real
processors and chat templates, and on real photographs the engine equals the unmodified transformers model
loaded from the same directory."""

import importlib.util
import json

import pytest
import torch
import transformers
from PIL import Image

import vlmprune
from conftest import FAMILIES
from vlmprune.prompting import read_image

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
LLAVA_PROMPT = "USER: <image>\nwhat is this? ASSISTANT:"
QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>what is this?<|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED = {
    "llava": ("LlavaProcessor", "CLIPImageProcessor", "LlavaForConditionalGeneration", LLAVA_PROMPT),
    "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessor", "LlavaNextForConditionalGeneration", LLAVA_PROMPT),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLForConditionalGeneration", QWEN_PROMPT),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2_5_VLForConditionalGeneration", QWEN_PROMPT),
}
# visual tokens of astronaut (128x128) and coffee (128x85), as the model itself produces them
VISUAL_TOKENS = {"llava": (16, 16), "llava_next": (88, 70), "qwen2_vl": (36, 35), "qwen2_5_vl": (36, 35)}
ATOL = 1e-4


def _rows(photo_jsonl):
    return [json.loads(line) for line in photo_jsonl.read_text().splitlines()]


def _photo(photo_jsonl, i):
    row = _rows(photo_jsonl)[i]
    with Image.open(photo_jsonl.parent / row["image"]) as img:
        return img.convert("RGB"), row["prompt"]


def _chat(processor, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def loaded(user_checkpoints):
    """family -> (PrunedModel from vlmprune.load, transformers' own model from the same directory)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = user_checkpoints[family]
            ref = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
            cache[family] = vlmprune.load(path), ref
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_real_processor_and_chat_template(user_checkpoints, loaded, family):
    path = user_checkpoints[family]
    assert (path / "model.safetensors").is_file()
    pm, ref = loaded(family)
    proc_cls, image_cls, model_cls, prompt = EXPECTED[family]
    proc, tok, cfg = pm.processor, pm.processor.tokenizer, pm.config
    assert type(proc).__name__ == proc_cls and type(ref).__name__ == model_cls
    # without torchvision transformers falls back to the PIL image processors (…ImageProcessorPil)
    assert type(proc.image_processor).__name__.removesuffix("Pil") == image_cls
    assert proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt
    text_cfg = cfg.get_text_config()
    assert text_cfg.vocab_size >= len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids(proc.image_token) == proc.image_token_id
    gen = pm.model.generation_config
    if family.startswith("llava"):
        assert proc.image_token == "<image>"
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        assert gen.eos_token_id == tok.eos_token_id and gen.bos_token_id == tok.bos_token_id
        assert tok("hi").input_ids[0] == tok.bos_token_id  # the Llama tokenizer prepends <s>
    else:
        assert proc.image_token == "<|image_pad|>"
        ids = tok.convert_tokens_to_ids
        assert cfg.video_token_id == ids("<|video_pad|>") == proc.video_token_id
        assert cfg.vision_start_token_id == ids("<|vision_start|>") and cfg.vision_end_token_id == ids("<|vision_end|>")
        assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
        assert gen.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
        assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids
        for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|endoftext|>"):
            assert tok.convert_ids_to_tokens(tok(special, add_special_tokens=False).input_ids) == [special]
        # the saved processor names its video processor, for environments with torchvision
        saved = json.loads((path / "processor_config.json").read_text())
        assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
        if importlib.util.find_spec("torchvision") is None:
            assert proc.video_processor is None  # tests/checkpoints.py: images and text only
    assert gen.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "left"


@pytest.mark.parametrize("family", FAMILIES)
def test_photo_prefill_and_greedy_equal_transformers(loaded, photo_jsonl, family):
    pm, ref = loaded(family)
    image, question = _photo(photo_jsonl, 0)
    inputs = pm.processor(images=image, text=_chat(pm.processor, question), return_tensors="pt")
    n_visual = int((inputs["input_ids"] == pm.config.image_token_id).sum())
    assert n_visual == VISUAL_TOKENS[family][0]
    with torch.no_grad():
        expected = ref(**inputs).logits
    out = pm(**inputs)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)

    expected_ids = ref.generate(**inputs, do_sample=False, max_new_tokens=5)
    ours = pm.generate(**inputs, max_new_tokens=5)
    assert torch.equal(ours, expected_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_of_two_photos_equals_each_alone(loaded, photo_jsonl, family):
    pm, ref = loaded(family)
    photos = [_photo(photo_jsonl, i) for i in (0, 1)]
    texts = [_chat(pm.processor, q) for _, q in photos]
    images = [img for img, _ in photos]
    batch = pm.processor(images=images, text=texts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert bool((mask[:, -1] == 1).all()) and not bool(mask.all())  # left-padded, ragged
    visual = (batch["input_ids"] == pm.config.image_token_id).sum(1).tolist()
    assert tuple(visual) == VISUAL_TOKENS[family]

    out = pm.generate(**batch, max_new_tokens=5, return_dict=True)
    logits = pm(**batch).logits
    for b in range(2):
        alone = pm.processor(images=images[b], text=texts[b], return_tensors="pt")
        solo = pm.generate(**alone, max_new_tokens=5, return_dict=True)
        assert torch.equal(out.sequences[b, -5:], solo.sequences[0, -5:])
        for step_batch, step_solo in zip(out.scores, solo.scores):
            torch.testing.assert_close(step_batch[b], step_solo[0], atol=ATOL, rtol=0)
        valid = mask[b].bool()
        torch.testing.assert_close(logits[b, valid], pm(**alone).logits[0], atol=ATOL, rtol=0)
    # and transformers' own generate on the same padded batch
    assert torch.equal(out.sequences, ref.generate(**batch, do_sample=False, max_new_tokens=5))


def test_finished_sample_is_padded_like_transformers(loaded, photo_jsonl):
    pm, ref = loaded("qwen2_vl")
    photos = [_photo(photo_jsonl, i) for i in (0, 1)]
    batch = pm.processor(
        images=[img for img, _ in photos], text=[_chat(pm.processor, q) for _, q in photos], padding=True,
        return_tensors="pt",
    )
    free = pm.generate(**batch, max_new_tokens=5)
    eos = int(free[0, -4])  # sample 0's second new token: it stops there
    assert eos not in free[1, -5:].tolist()
    expected = ref.generate(**batch, do_sample=False, max_new_tokens=5, eos_token_id=eos)
    assert torch.equal(pm.generate(**batch, max_new_tokens=5, eos_token_id=eos), expected)


def test_photo_jsonl_rows_point_to_readable_photographs(photo_jsonl):
    rows = _rows(photo_jsonl)
    assert len(rows) == 6
    sizes = set()
    for row in rows:
        assert set(row) == {"image", "prompt", "answer"} and row["prompt"].strip() and row["answer"].strip()
        assert not row["image"].startswith("/") and row["image"].startswith("images/")
        file = photo_jsonl.parent / row["image"]
        with Image.open(file) as raw:
            raw.verify()
        img = read_image(file)
        assert img.mode == "RGB" and max(img.size) == 128 and min(img.size) >= 48
        low, high = img.convert("L").getextrema()
        assert high - low > 100  # a photograph, not a flat fill
        sizes.add((row["image"], img.size))
    assert len({name for name, _ in sizes}) == 6
    assert {s.rsplit(".", 1)[1] for s, _ in sizes} == {"jpg", "png"}
