"""The testbed recipe: a small LLaVA (CLIP tower on 84x84 grayscale, patch 7 -> 144 visual tokens, a
Llama text model) with a word-level tokenizer and a processor that transformers loads like any LLaVA
checkpoint. Issue 3 trains it; `random_checkpoint` saves it with random weights for demos and tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
BASE_WORDS = ["user", ":", "assistant", "?", "what", "is", "in", "the", "image", "a", "an", "of", "there", "how", "many", "where"]

IMAGE_SIZE = 84
PATCH = 7


def build_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer: special tokens first, then `words` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


# the testbed's prompt format (`data.PROMPT_TEMPLATE`) as a chat template, so user data takes the same path
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}assistant : {% for part in message['content'] %}{{ part['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def is_recipe(config, processor) -> bool:
    """Whether a model is of this recipe (a 1-channel 84-pixel tower, the word tokenizer with ``<image>``):
    FashionScenes is the default data only for such a model."""
    vision = getattr(config, "vision_config", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    return (
        getattr(vision, "num_channels", None) == 1
        and getattr(vision, "image_size", None) == IMAGE_SIZE
        and tokenizer is not None
        and "<image>" in tokenizer.get_vocab()
    )


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5], image_std=[0.5], do_convert_rgb=False,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed: int = 0, layers: int = 8, hidden: int = 256, heads: int = 8):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=1, projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def random_checkpoint(out_dir: str | Path, seed: int = 0, words: list[str] = BASE_WORDS) -> Path:
    """Save a random-weight model of the recipe, with its processor, as a transformers checkpoint."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(words)
    model = build_model(tokenizer, seed)
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    return out
