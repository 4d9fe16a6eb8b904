"""Examples to model inputs: the chat-template prompt and the image through the checkpoint's
processor, left-padded batches (so a sample's positions and answer do not depend on its batch)."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import VlmpruneError
from .examples import Example
from .images import conform_image
from .prompts import chat_prompt

NOT_MODEL_INPUTS = ("token_type_ids", "mm_token_type_ids")  # the engine finds visual tokens from input_ids


def image_channels(config: Any) -> int:
    """How many channels the model's vision tower takes (3 unless its config says otherwise)."""
    vision = getattr(config, "vision_config", None)
    for name in ("num_channels", "in_channels", "in_chans"):
        value = getattr(vision, name, None)
        if isinstance(value, int):
            return value
    return 3


def encode_examples(processor: Any, examples: Sequence[Example], channels: int = 3, with_answer: bool = False) -> dict:
    """One left-padded batch of model inputs (``input_ids``, ``attention_mask`` and the family's pixel
    inputs). With `with_answer`, each example's answer is the assistant's turn (teacher forcing, e.g.
    calibration on reference answers); rows without an answer are prompt only."""
    if processor is None:
        raise VlmpruneError("this checkpoint has no processor files; save one with processor.save_pretrained(DIR)")
    if not examples:
        raise VlmpruneError("no examples to encode")
    texts, images = [], []
    for ex in examples:
        texts.append(chat_prompt(processor, ex.prompt, ex.image is not None, ex.answer if with_answer else None, ex.origin))
        if ex.image is not None:
            images.append(conform_image(ex.image, channels, ex.origin))
    tokenizer = getattr(processor, "tokenizer", processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        kwargs = {"images": images} if images else {}
        out = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    except Exception as err:  # name the row the processor cannot take
        raise _first_bad_row(processor, texts, examples, channels, err) from err
    finally:
        tokenizer.padding_side = side
    return {k: v for k, v in out.items() if k not in NOT_MODEL_INPUTS}


def _first_bad_row(processor, texts, examples, channels, err) -> VlmpruneError:
    for text, ex in zip(texts, examples):
        try:
            kwargs = {"images": [conform_image(ex.image, channels, ex.origin)]} if ex.image is not None else {}
            processor(text=[text], return_tensors="pt", **kwargs)
        except Exception as row_err:
            return VlmpruneError(f"{ex.origin}: the model's processor cannot take this row: {str(row_err).splitlines()[0]}")
    return VlmpruneError(f"the model's processor cannot take this batch: {str(err).splitlines()[0]}")


def example_batches(processor: Any, examples: Sequence[Example], batch_size: int, channels: int = 3,
                    with_answer: bool = False) -> list[dict]:
    """`encode_examples` over consecutive batches of `batch_size`."""
    if batch_size < 1:
        raise VlmpruneError(f"batch size must be >= 1, got {batch_size}")
    return [encode_examples(processor, examples[i : i + batch_size], channels, with_answer)
            for i in range(0, len(examples), batch_size)]
