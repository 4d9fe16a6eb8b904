"""2:4-pruned linears as PyTorch semi-structured sparse tensors, for real speed on CUDA GPUs.

A linear whose weight keeps at most 2 of every 4 consecutive input columns in every row (what
``prune_weights(nm="2:4")`` writes) can run on the sparse tensor cores of NVIDIA GPUs of compute
capability 8.0 and newer: `torch.sparse.to_sparse_semi_structured` packs the kept half and its metadata,
and ``F.linear`` then dispatches to cuSPARSELt or CUTLASS. The result equals the masked dense product
up to the kernels' accumulation order (bf16 / fp16 tolerance).

Where the kernels do not exist (the CPU, older GPUs, float32 weights) nothing is converted and one
notice says why: the model stays dense and gives the same answers, only without the speed-up.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLS = 32, 64  # the stricter of the two backends' (CUTLASS, cuSPARSELt) fp16/bf16 shape rules


@dataclass
class SemiStructuredReport:
    """What `to_semi_structured` did: the converted linears' names, and every other 2:4 candidate's reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notice: str | None = None  # why nothing could be converted on this device, if so

    def summary(self) -> str:
        if self.notice:
            return self.notice
        return f"2:4 sparse kernels: {len(self.converted)} linears converted, {len(self.skipped)} left dense"


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every row keeps at most 2 of each group of 4 consecutive input columns (the rest exactly 0)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    kept = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((kept <= 2).all())


def kernel_support(device: torch.device) -> str | None:
    """None where the semi-structured kernels run on ``device``, else why not (one line)."""
    if device.type != "cuda":
        return (f"2:4 sparse kernels need a CUDA GPU of compute capability 8.0+ (the weights are on {device.type}); "
                "the model stays dense, with the same answers and no sparse speed-up")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 sparse kernels need compute capability 8.0+, this GPU ({torch.cuda.get_device_name(device)}) "
                f"has {major}.{minor}; the model stays dense")
    return None


def _why_not(weight: torch.Tensor) -> str | None:
    """Why this 2:4 weight cannot become a semi-structured tensor, or None."""
    if weight.dtype not in KERNEL_DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} (the kernels take float16 / bfloat16; load with dtype='bfloat16')"
    rows, cols = weight.shape
    if rows % MIN_ROWS or cols % MIN_COLS:
        return f"shape {rows} x {cols} (the kernels need rows a multiple of {MIN_ROWS} and columns of {MIN_COLS})"
    return None


def to_semi_structured(
    model: nn.Module,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    notify: bool = True,
) -> SemiStructuredReport:
    """Turn every 2:4-sparse ``nn.Linear`` of ``model`` into a semi-structured sparse weight, in place.

    Linears that are not 2:4 (the LM head, dense layers) stay as they are; 2:4 linears the kernels
    cannot take (dtype, shape) are listed in the report's ``skipped`` with the reason. Off a CUDA GPU of
    compute capability 8.0+, nothing changes and the report's ``notice`` (also a warning, with
    ``notify``) says why. ``convert`` replaces `torch.sparse.to_sparse_semi_structured` (for tests)."""
    report = SemiStructuredReport()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.device.type != "meta"]
    candidates = [(name, m) for name, m in linears if is_two_four(m.weight.detach())]
    if not candidates:
        report.notice = "2:4 sparse kernels: no linear of this model is 2:4-sparse (prune with --nm 2:4 first); nothing converted"
    elif convert is None:
        report.notice = kernel_support(candidates[0][1].weight.device)
    if report.notice:
        if notify:
            warnings.warn(report.notice, stacklevel=2)
        return report
    real = convert is None
    convert = convert or torch.sparse.to_sparse_semi_structured
    for name, module in candidates:
        reason = _why_not(module.weight)
        if reason is None and real:
            reason = kernel_support(module.weight.device)  # a model split over devices: each linear where it lives
        if reason:
            report.skipped[name] = reason
            continue
        module.weight = nn.Parameter(convert(module.weight.detach().contiguous()), requires_grad=False)
        report.converted.append(name)
    return report
