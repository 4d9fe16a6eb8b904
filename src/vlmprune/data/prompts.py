"""Prompts in the checkpoint's own format: the processor's chat template with an image entry and the text."""

from __future__ import annotations

from typing import Any

from ..errors import VlmpruneError


def image_placeholder(processor: Any) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def chat_messages(prompt: str, has_image: bool, answer: str | None = None) -> list[dict]:
    """One user turn (an image entry, then the text), and the assistant's answer when given."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def chat_prompt(processor: Any, prompt: str, has_image: bool = True, answer: str | None = None, origin: str = "") -> str:
    """The model's prompt text for one example, ready for the processor.

    With the checkpoint's chat template (``processor.apply_chat_template``); the generation prompt is
    added unless `answer` is given (then the answer is the assistant's turn, for teacher forcing). A
    prompt that already holds the image placeholder is taken as a finished prompt, verbatim."""
    placeholder = image_placeholder(processor)
    if placeholder in prompt:
        if not has_image:
            raise VlmpruneError(f"{origin}: the prompt has the image placeholder {placeholder!r} but the row has no image")
        return prompt if answer is None else f"{prompt} {answer}"
    template = getattr(processor, "chat_template", None)
    if not template:
        raise VlmpruneError(
            f"{origin}: the checkpoint's processor has no chat template, so vlmprune cannot place the image; save one "
            f"(processor.chat_template = ...; processor.save_pretrained(DIR)) or write the prompt with {placeholder!r} in it"
        )
    messages = chat_messages(prompt, has_image, answer)
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
