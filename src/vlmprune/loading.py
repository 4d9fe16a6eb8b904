"""`load` a checkpoint (local directory, the bundled testbed, or a hub id) and `wrap` a built model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import VlmpruneError
from .models import family
from .processors import load_processor
from .pruned_model import PrunedModel


def wrap(model: nn.Module, processor: Any = None) -> PrunedModel:
    """Wrap an already-built transformers VLM (weights shared). Unsupported classes get a clear error."""
    return PrunedModel(model, processor)


def _resolve(path_or_name: str | os.PathLike) -> tuple[str, bool]:
    """(location, is_local)."""
    text = str(path_or_name)
    if text == "testbed":
        from .testbed import checkpoint_dir  # imported lazily: the testbed is optional at import time

        return str(checkpoint_dir()), True
    local = Path(text).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise VlmpruneError(f"{local} has no config.json; point --model at a transformers checkpoint directory")
        return str(local), True
    return text, False


DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's big-model dispatch
_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|auto)")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when a GPU is visible, else the CPU) as a
    `torch.device`; None stays None. A CUDA device that is not there is a `VlmpruneError`."""
    if device is None:
        return None
    text = str(device).strip().lower()
    if not isinstance(device, (str, torch.device)) or not _DEVICE.fullmatch(text):
        raise VlmpruneError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(text)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise VlmpruneError(f"device {text!r} was asked for but no CUDA GPU is available to torch {torch.__version__} "
                                "(no GPU visible, or a CPU-only build); use --device cpu (device='cpu') or auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise VlmpruneError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"bfloat16"``, ``"float16"``, ``"float32"`` (or bf16 / fp16 / fp32 / half, or a floating
    `torch.dtype`) as a `torch.dtype`; ``"auto"`` (or None) stays ``"auto"``: the checkpoint's own dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return "auto"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise VlmpruneError(f"dtype must be a floating-point type (bfloat16, float16, float32), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise VlmpruneError(f"dtype must be 'bfloat16', 'float16', 'float32' or 'auto', got {dtype!r}")


def check_device_map(device_map: Any, max_memory: Any = None, offload_folder: Any = None, device: Any = None) -> None:
    """Refuse load options that do not go together (see `load`), with a message that names the fix."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise VlmpruneError("max_memory and offload_folder shape a device_map; give device_map='auto' (--device-map auto) with them")
        return
    if device is not None:
        raise VlmpruneError("give either device (one device for the whole model) or device_map (a split over devices), not both")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise VlmpruneError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a dict of module name -> "
                                f"device ('cuda:0', 0, 'cpu', 'disk'), got {device_map!r}")
    elif isinstance(device_map, dict):
        if not device_map:
            raise VlmpruneError("device_map is an empty dict; map module names to devices, e.g. {'': 'cuda:0'}")
        for name, where in device_map.items():
            ok = isinstance(where, int) and not isinstance(where, bool) and where >= 0
            ok = ok or isinstance(where, torch.device) or (isinstance(where, str) and (where in ("cpu", "disk") or _DEVICE.fullmatch(where)))
            if not isinstance(name, str) or not ok:
                raise VlmpruneError(f"device_map entry {name!r}: {where!r} is not a device; use a GPU index, 'cuda:N', 'cpu' or 'disk'")
            if str(where).startswith("cuda") or isinstance(where, int):
                resolve_device(f"cuda:{where}" if isinstance(where, int) else str(where))
        if "disk" in map(str, device_map.values()) and offload_folder is None:
            raise VlmpruneError("device_map sends modules to 'disk'; give offload_folder (a directory for the offloaded weights)")
    else:
        raise VlmpruneError(f"device_map must be 'auto' or a dict of module name -> device, got {type(device_map).__name__}")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise VlmpruneError(f"max_memory must be a dict of device -> size, e.g. {{0: '70GiB', 'cpu': '100GiB'}}, got {max_memory!r}")


def load_options(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> dict:
    """Validated keyword arguments for a transformers ``from_pretrained`` (``dtype`` and ``device_map``,
    plus ``max_memory`` / ``offload_folder`` when given): ``device`` becomes a one-device map, so the
    weights are read straight onto it."""
    check_device_map(device_map, max_memory, offload_folder, device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    resolved = resolve_device(device)
    if resolved is not None:
        kwargs["device_map"] = {"": str(resolved)}
    elif device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def check_materialised(model: nn.Module) -> None:
    """Every weight left on the meta device must belong to a module that an accelerate offload hook
    loads at its forward; a tensor offloaded without one (e.g. a parameter kept directly on a parent
    module, like LLaVA-NeXT's ``image_newline``) could never be read."""
    from .models.base import offload_hook

    for name, module in model.named_modules():
        hooked = offload_hook(module) is not None
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "meta" and not hooked:
                full = f"{name}.{pname}" if name else pname
                raise VlmpruneError(f"the device_map offloads {full!r}, which no offload hook loads back (it sits directly on "
                                    f"{name or 'the model'}); map it to a device (GPU or 'cpu') instead")


def load(
    path_or_name: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    sparse_kernels: bool = False,
) -> PrunedModel:
    """Load a supported VLM checkpoint and its processor, and wrap it.

    ``path_or_name``: a local checkpoint directory, ``"testbed"`` (the bundled model), or a hub id
    (needs internet). Weights are read from safetensors only; `trust_remote_code` stays off unless asked.

    Placement: ``device`` puts the whole model on ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``
    (CUDA when available, else the CPU); None is transformers' default (the CPU). ``device_map``
    (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict of module name -> GPU index / ``"cpu"`` /
    ``"disk"``) splits it with accelerate's big-model dispatch, shaped by ``max_memory`` (e.g.
    ``{0: "70GiB", "cpu": "100GiB"}``) and ``offload_folder`` (for modules sent to disk); the engine
    runs each decoder layer where it lives and moves its inputs there. ``dtype``: ``"bfloat16"``,
    ``"float16"``, ``"float32"``, a `torch.dtype`, or ``"auto"`` (the checkpoint's dtype).

    ``sparse_kernels``: turn 2:4-pruned linears (``prune_weights(nm="2:4")``) into PyTorch
    semi-structured sparse tensors, which run on the sparse tensor cores of CUDA GPUs of compute
    capability 8.0+ in float16 / bfloat16 (`vlmprune.weights.semi_structured`); elsewhere the model
    stays dense, with a notice.
    """
    from transformers import AutoConfig

    options = load_options(device, dtype, device_map, max_memory, offload_folder)  # fails fast, before any reading
    location, is_local = _resolve(path_or_name)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = "" if is_local else " (not a local directory, and the hub could not be reached or has no such model)"
        raise VlmpruneError(f"cannot load a model config from {location!r}{hint}: {str(err).splitlines()[0]}") from err
    cls = family(config.model_type, f"{location}: ").transformers_class()
    model = from_pretrained(cls, location, options, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    processor = load_processor(location, config.model_type, trust_remote_code)
    if sparse_kernels:
        from .weights.semi_structured import to_semi_structured

        to_semi_structured(model)
    return PrunedModel(model, processor)


def from_pretrained(cls, location: str, options: dict, **kwargs) -> nn.Module:
    """``cls.from_pretrained`` from safetensors with `load_options`' keywords; errors as `VlmpruneError`."""
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(location, use_safetensors=True, **options, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "device_map" in options and ("offload" in first or "disk" in first or "device_map" in first or "max_memory" in first):
            raise VlmpruneError(f"cannot place {location!r} with device_map={options['device_map']!r}: {first}") from err
        raise VlmpruneError(
            f"cannot load weights from {location!r}: {first} "
            "(vlmprune reads safetensors only; a corrupt or partial checkpoint must be re-saved)"
        ) from err
    if "device_map" in options:
        check_materialised(model)
    return model
