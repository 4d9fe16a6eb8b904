"""From an image file and a prompt to model inputs (through the checkpoint's processor), and back to text."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .data.batches import image_channels
from .data.images import conform_image, read_image  # noqa: F401  (read_image: the CLI's --image reader)
from .engine.plan import Plan
from .errors import VlmpruneError
from .pruned_model import GenerationResult, PrunedModel


def build_inputs(pm: PrunedModel, prompt: str, image: Any = None) -> dict[str, torch.Tensor]:
    """Tokenise `prompt` (with the processor's image placeholder where the image goes) and process `image`
    (a PIL image or uint8 array, first converted to the channels the model's vision tower takes)."""
    proc = pm.processor
    if proc is None:
        raise VlmpruneError("this checkpoint has no processor files; save one with processor.save_pretrained(DIR)")
    placeholder = getattr(proc, "image_token", "<image>")
    has_slot = placeholder in prompt
    if image is not None and not has_slot:
        raise VlmpruneError(
            f"the prompt has no image placeholder {placeholder!r}; put it where the image goes, "
            f"e.g. 'USER: {placeholder} what is in the image ? ASSISTANT:'"
        )
    if image is None and has_slot:
        raise VlmpruneError(f"the prompt has an image placeholder {placeholder!r} but no image was given (--image FILE)")
    # the image in the mode the vision tower takes (an RGB photo becomes greyscale for the 1-channel
    # testbed, with a one-time notice); the processor then resizes and crops it
    kwargs = {"images": conform_image(image, image_channels(pm.config))} if image is not None else {}
    try:
        inputs = proc(text=prompt, return_tensors="pt", **kwargs)
    except Exception as err:  # one clear line, not a traceback from inside transformers
        raise VlmpruneError(f"the model's processor cannot take this image and prompt: {str(err).splitlines()[0]}; "
                            "pass an 8-bit RGB or greyscale PNG/JPEG image") from err
    return {k: v for k, v in inputs.items() if k != "token_type_ids"}


def parse_plan(text: str | None, skip: str | None = None) -> Plan | None:
    """A Plan from JSON text or a JSON file path, plus an optional comma-separated skip list (joined to
    the plan's own skips; its keep, merge and overhead are unchanged)."""
    plan = None
    if text:
        source = Path(text)
        raw = source.read_text() if source.is_file() else text
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise VlmpruneError(f"--plan is neither a JSON file nor JSON text: {err}") from err
        plan = Plan.from_dict(data)
    if skip:
        try:
            layers = [int(s) for s in skip.split(",") if s.strip()]
        except ValueError as err:
            raise VlmpruneError(f"--skip takes comma-separated layer indices, got {skip!r}") from err
        if plan is not None and plan.skip.per_sample:
            raise VlmpruneError("--skip cannot be combined with a plan whose skip lists are per sample")
        skipped = sorted(set(layers) | set(plan.skip.layers if plan else ()))
        plan = replace(plan, skip=skipped) if plan else Plan(skip=skipped)  # keep, merge and overhead stay
    return plan


def generate_answer(
    pm: PrunedModel, prompt: str, image: Any = None, prune: Any = None, max_new_tokens: int = 20
) -> tuple[str, GenerationResult]:
    """Greedy answer text for one image and prompt, with the run's accounting."""
    inputs = build_inputs(pm, prompt, image)
    result = pm.generate(**inputs, prune=prune, max_new_tokens=max_new_tokens, return_dict=True)
    new = result.sequences[0, inputs["input_ids"].shape[1] :]
    return pm.processor.tokenizer.decode(new, skip_special_tokens=True).strip(), result
