"""Calibration batches cut for scoring: the first samples, one sample at a time, text in pieces; and
the calibration loss a whole-model score reads (ECoFLaP's importance)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .calibrate import model_inputs

ROW_KEYS = {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes"}  # inputs that split by sample


def calibration_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's next-token cross-entropy on the batch itself: ``labels`` = input_ids with padding and
    image placeholders set to -100 (or the batch's own ``labels``). A VLM runs whole, tower included."""
    inputs = model_inputs(model, batch)
    return model(**inputs, labels=calibration_labels(model, batch), use_cache=False).loss


def calibration_labels(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The batch's own ``labels``, or its input_ids with padding and image placeholders set to -100."""
    labels = batch.get("labels")
    if labels is None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(~mask.bool(), -100)
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None:
            labels = labels.masked_fill(ids == image_id, -100)
    return labels


def loss_sums(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """Per row, in one forward: ``[sum of next-token cross-entropies, labelled tokens]`` over the row's
    own labels (shape ``[rows, 2]``); for any set of rows, sum / count is `calibration_loss` of those
    rows batched alone (the token mean, as transformers' loss)."""
    labels = calibration_labels(model, batch)
    logits = model(**model_inputs(model, batch), use_cache=False).logits
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t + 1
    ce = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return torch.stack([ce.view(targets.shape).sum(1), (targets != -100).sum(1).to(ce.dtype)], dim=1)


def first_samples(batches: list[dict], n: int, image_token_id: int | None) -> list[dict]:
    """The first `n` samples: whole batches, the last one cut to size where it splits into samples."""
    out, have = [], 0
    for batch in batches:
        if have >= n:
            break
        rows = int(batch["input_ids"].shape[0])
        if have + rows > n and splits(batch, image_token_id):
            batch = {k: v[: n - have] for k, v in batch.items()}
            rows = n - have
        out.append(batch)
        have += rows
    return out


def splits(batch: Mapping, image_token_id: int | None) -> bool:
    """Whether every input of the batch is one row per sample (text; LLaVA with one image per sample:
    every row holds the same, nonzero number of image tokens), so it splits into samples."""
    ids = batch["input_ids"]
    if not (set(batch) <= ROW_KEYS and all(isinstance(v, torch.Tensor) and v.shape[0] == ids.shape[0] for v in batch.values())):
        return False
    if "pixel_values" not in batch:
        return True
    per_row = (ids == image_token_id).sum(-1) if image_token_id is not None else ids.new_zeros(1)
    return bool((per_row > 0).all() and (per_row == per_row[0]).all())


def split_samples(batches: list[dict], image_token_id: int | None) -> list[dict]:
    """Each splittable batch as one-sample batches, trimmed of padding columns; others as they are."""
    out = []
    for batch in batches:
        if not splits(batch, image_token_id):
            out.append(batch)
            continue
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            mask = row.get("attention_mask")
            if mask is not None and mask.any():
                kept = mask[0].nonzero()
                start, stop = int(kept[0]), int(kept[-1]) + 1  # left or right padding
                for key in ("input_ids", "attention_mask", "labels"):
                    if key in row:
                        row[key] = row[key][:, start:stop]
            out.append(row)
    return out


def pieces(batches: list[dict], size: int) -> list[dict]:
    """One-sample text batches cut into consecutive pieces of `size` tokens (a last piece shorter than
    half of `size` joins the one before); batches with image inputs or several rows stay whole."""
    if not size:
        return batches
    out = []
    for batch in batches:
        length = int(batch["input_ids"].shape[1])
        if "pixel_values" in batch or batch["input_ids"].shape[0] != 1 or length < 2 * size:
            out.append(batch)
            continue
        starts = list(range(0, length, size))
        if length - starts[-1] < size / 2:
            starts.pop()
        for a, b in zip(starts, starts[1:] + [length]):
            out.append({k: v[:, a:b] for k, v in batch.items()})
    return out
