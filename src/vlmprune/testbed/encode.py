"""FashionScenes samples -> model tensors, without the per-image processor round trip.

The result equals what the checkpoint's `LlavaProcessor` produces for ``prompt(question)`` and the
image (a test checks it): word ids from the tokenizer's vocabulary with ``<image>`` expanded to one
placeholder per visual token, and pixels scaled to ``(x / 255 - 0.5) / 0.5`` as ``[B, 1, 84, 84]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import data
from .recipe import IMAGE_SIZE, PATCH

N_VISUAL = (IMAGE_SIZE // PATCH) ** 2  # 144


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """``[B, 84, 84]`` uint8 -> ``[B, 1, 84, 84]`` float, normalised like the processor (mean 0.5, std 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)
    return ((x - 0.5) / 0.5)[:, None]


def encode(
    samples: Sequence[data.Sample], tokenizer, with_answer: bool = False, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Batch tensors for `samples` (anything with ``image``, ``question`` and ``answer``). With
    `with_answer`, the answer's words and ``</s>`` follow the prompt and ``labels`` holds their ids
    (-100 elsewhere), for teacher-forced training."""
    vocab = tokenizer.get_vocab()
    image_id, eos_id = vocab["<image>"], tokenizer.eos_token_id
    rows, label_rows = [], []
    for s in samples:
        ids = []
        for word in data.prompt(s.question).split():
            ids.extend([image_id] * N_VISUAL if word == "<image>" else [vocab.get(word, tokenizer.unk_token_id)])
        labels = [-100] * len(ids)
        if with_answer:
            tail = [vocab[w] for w in s.answer.split()] + [eos_id]
            ids, labels = ids + tail, labels + tail
        rows.append(ids)
        label_rows.append(labels)
    length = max(map(len, rows))
    batch = len(rows)
    input_ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        sl = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
    out = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values(np.stack([s.image for s in samples])))
    if with_answer:
        out["labels"] = labels
    return out


def encode_batches(samples: Sequence[data.Sample], tokenizer, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """`encode` in consecutive batches of `batch_size` (calibration inputs for ShortGPT and weight pruning)."""
    samples = list(samples)
    return [encode(samples[i : i + batch_size], tokenizer) for i in range(0, len(samples), batch_size)]


def cell_token_indices(cell: int) -> torch.Tensor:
    """The visual-token indices (0..143, row-major patches) covering one of the 9 cells."""
    per_side = IMAGE_SIZE // PATCH  # 12 patches per image side
    per_cell = data.ITEM_SIZE // PATCH  # 4 patches per cell side
    row, col = divmod(cell, data.GRID)
    rows = torch.arange(row * per_cell, (row + 1) * per_cell)
    cols = torch.arange(col * per_cell, (col + 1) * per_cell)
    return (rows[:, None] * per_side + cols[None, :]).reshape(-1)
