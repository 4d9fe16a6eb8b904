"""Calibration and training data: FashionScenes **training** scenes (the shipped evaluation set is
never used), CPython's own documentation text for plain causal LMs, or a user's data source.

Every seeded draw of scenes goes through `training_scenes`, with the seed passed by name:

* `CALIBRATION_SEED` (12345): the calibration scenes of methods that calibrate (ShortGPT) in
  ``vlmprune generate``, the sweep and lmms-eval;
* weight pruning's ``--seed`` (default 0), through `calibration_batches`;
* the two trainers' per-step scenes (`vlmprune.training.step_seed`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VlmpruneError

CALIBRATION_SEED = 12345  # the default calibration scenes of methods that calibrate (ShortGPT)
TEXT_SEQ_LEN = 128  # tokens per text calibration sequence
TEXT_BATCH = 8
SCENE_BATCH = 16


def check_count(n: int) -> int:
    """`n` if it is a positive number of calibration samples; otherwise the error naming ``--calib``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VlmpruneError(f"--calib must be a positive number of calibration samples, got {n!r}")
    return n


def training_scenes(n: int, seed: int, source=None) -> list:
    """`n` FashionScenes scenes of the **training** split drawn with `seed` (the same scenes for the
    same `n`, `seed` and source); `source`: Fashion-MNIST's training split as
    `testbed.data.load_fashion_mnist` returns it, loaded when None."""
    from ..testbed import data

    return data.generate(n, "train", seed=seed, source=source)


def scene_batches(tokenizer, n: int, seed: int, batch_size: int = SCENE_BATCH) -> list[dict]:
    """`n` training scenes drawn with `seed` (prompt + image, no answer) in batches, encoded for the
    testbed recipe's word-level tokenizer. Needs Fashion-MNIST (the Debian package)."""
    from ..testbed import data
    from ..testbed.encode import encode_batches

    n = check_count(n)
    if "<image>" not in tokenizer.get_vocab():
        raise VlmpruneError(
            "FashionScenes calibration encodes prompts for the testbed recipe's tokenizer, and this model's has no "
            "'<image>' token; give your own calibration data (--data / --calib-data, or batches from Python)"
        )
    try:
        source = data.load_fashion_mnist("train", data.DEFAULT_ROOT)
    except VlmpruneError as err:
        raise VlmpruneError(
            f"calibration uses FashionScenes training scenes, which need Fashion-MNIST ({err}); install it with "
            "`apt-get install dataset-fashion-mnist` (the shipped evaluation set is never used for calibration)"
        ) from None
    return encode_batches(training_scenes(n, seed, source), tokenizer, batch_size)


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
    n = check_count(n)
    ids = topic_token_ids(tokenizer)
    if len(ids) < n * seq_len:
        raise VlmpruneError(
            f"the calibration text gives {len(ids)} tokens, fewer than --calib {n} x {seq_len}; use a smaller --calib"
        )
    return token_rows(ids, n, seq_len, batch_size)


def calibration_batches(model: nn.Module, processor_or_tokenizer, n: int, seed: int = 0, data: str | None = None,
                        read_options: dict | None = None) -> list[dict]:
    """Weight pruning's calibration data for `model`: `n` samples of `data` (a source `read_examples`
    reads for a VLM, `read_texts` for a causal LM), or by default FashionScenes training scenes drawn
    with `seed` for the testbed recipe and CPython's documentation text for a causal LM. Any other VLM
    needs `data`."""
    from ..models import find_family
    from ..testbed.recipe import is_recipe

    if processor_or_tokenizer is None:
        raise VlmpruneError("the checkpoint has no tokenizer or processor saved beside it; calibration needs one")
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    is_vlm = find_family(getattr(model.config, "model_type", None)) is not None
    if data is not None and str(data) != "testbed":
        return data_batches(model, processor_or_tokenizer, data, n, is_vlm, read_options or {})
    if is_vlm:
        if not is_recipe(model.config, processor_or_tokenizer):
            raise VlmpruneError(
                "calibration needs data for this model: pass --data FILE (JSONL rows {\"image\": PATH, \"prompt\": TEXT}, "
                "a folder of images with --prompt, or a .parquet / hf:NAME dataset); FashionScenes is the default only "
                "for the testbed"
            )
        return scene_batches(tokenizer, n, seed)
    if data is not None:
        raise VlmpruneError("--data testbed is FashionScenes, for VLMs; give a causal LM a text or JSONL {\"text\"} file")
    return text_batches(tokenizer, n)


def data_batches(model: nn.Module, processor_or_tokenizer, source: str, n: int, is_vlm: bool, read_options: dict) -> list[dict]:
    """`n` calibration samples from a user's data: image + prompt (+ answer, as the assistant's turn)
    rows through the checkpoint's chat template for a VLM; `TEXT_SEQ_LEN`-token slices of the texts
    for a causal LM."""
    from .batches import example_batches, image_channels
    from .examples import take
    from .sources import read_examples, read_texts

    n = check_count(n)
    if is_vlm:
        examples = take(read_examples(source, **read_options), n, "--calib", str(source))
        return example_batches(processor_or_tokenizer, examples, SCENE_BATCH, image_channels(model.config), with_answer=True)
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    ids = tokenizer("\n\n".join(read_texts(source)), add_special_tokens=False)["input_ids"]
    if len(ids) < n * TEXT_SEQ_LEN:
        raise VlmpruneError(f"{source} gives {len(ids)} tokens, fewer than --calib {n} x {TEXT_SEQ_LEN}; use a smaller --calib or more text")
    return token_rows(ids, n, TEXT_SEQ_LEN, TEXT_BATCH)
