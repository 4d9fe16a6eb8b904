"""Calibration batches for weight pruning: FashionScenes training scenes for the testbed VLM, CPython's
own documentation text for plain causal LMs. The shipped evaluation set is never used for calibration."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VlmpruneError

TEXT_SEQ_LEN = 128  # tokens per text calibration sequence
TEXT_BATCH = 8
SCENE_BATCH = 16


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VlmpruneError(f"--calib must be a positive number of calibration samples, got {n!r}")
    return n


def scene_batches(tokenizer, n: int, seed: int = 0, batch_size: int = SCENE_BATCH) -> list[dict]:
    """`n` FashionScenes **training** scenes (prompt + image, no answer) in batches, encoded for the
    testbed recipe's word-level tokenizer. Needs Fashion-MNIST (the Debian package)."""
    from ..testbed import data
    from ..testbed.encode import encode_batches

    n = _check_n(n)
    if "<image>" not in tokenizer.get_vocab():
        raise VlmpruneError(
            "FashionScenes calibration encodes prompts for the testbed recipe's tokenizer, and this model's has no "
            "'<image>' token; call prune_weights from Python with your own calibration batches"
        )
    try:
        source = data.load_fashion_mnist("train", data.DEFAULT_ROOT)
    except VlmpruneError as err:
        raise VlmpruneError(
            f"calibration uses FashionScenes training scenes, which need Fashion-MNIST ({err}); install it with "
            "`apt-get install dataset-fashion-mnist` (the shipped evaluation set is never used for calibration)"
        ) from None
    return encode_batches(data.generate(n, "train", seed=seed, source=source), tokenizer, batch_size)


def topic_token_ids(tokenizer) -> list[int]:
    """CPython's ``pydoc_data.topics`` (the help() texts, topics in sorted order, joined by blank lines)
    as token ids: text that ships with every Python. Calibration reads it from the start
    (`text_batches`), evaluation from the end (`eval.perplexity.heldout_batches`)."""
    from pydoc_data.topics import topics

    return tokenizer("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]


def token_rows(ids: list[int], n: int, seq_len: int, batch_size: int) -> list[dict]:
    """`n` rows of `seq_len` consecutive ids (from the start of `ids`), in batches, unpadded."""
    rows = torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (n, seq_len)
    return [
        dict(input_ids=rows[i : i + batch_size], attention_mask=torch.ones_like(rows[i : i + batch_size]))
        for i in range(0, n, batch_size)
    ]


def text_batches(tokenizer, n: int, seq_len: int = TEXT_SEQ_LEN, batch_size: int = TEXT_BATCH) -> list[dict]:
    """`n` sequences of `seq_len` tokens from the **start** of `topic_token_ids` (a deterministic slice;
    held-out evaluation text comes from the end)."""
    n = _check_n(n)
    ids = topic_token_ids(tokenizer)
    if len(ids) < n * seq_len:
        raise VlmpruneError(
            f"the calibration text gives {len(ids)} tokens, fewer than --calib {n} x {seq_len}; use a smaller --calib"
        )
    return token_rows(ids, n, seq_len, batch_size)


def calibration_batches(model: nn.Module, processor_or_tokenizer, n: int, seed: int = 0) -> list[dict]:
    """The default calibration data for `model`: training scenes for a VLM (the testbed recipe), text for
    a causal LM."""
    from ..models import ADAPTERS

    if processor_or_tokenizer is None:
        raise VlmpruneError("the checkpoint has no tokenizer or processor saved beside it; calibration needs one")
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    if getattr(model.config, "model_type", None) in ADAPTERS:
        return scene_batches(tokenizer, n, seed)
    return text_batches(tokenizer, n)
