"""Latency and memory of one batch through the engine: time to first token, per-token decode, peak
memory and KV-cache size, under any ``prune=`` decision and the model's own attention backend.

    from vlmprune.eval.latency import measure_latency
    lat = measure_latency(pm, inputs, prune=vlmprune.FastV(layer=2, keep=0.25), decode_tokens=8, repeats=5)
    print(lat.prefill_ms, lat.decode_ms_per_token, lat.peak_memory_bytes, lat.kv_bytes_prefill)

What is timed (``time.perf_counter``, with a device synchronisation before each reading on CUDA):

* **prefill** (time to first token): the vision tower and input embeddings (``pm.prepare``), the
  method's decision (``decide``: a before-the-LLM method's scoring is *inside* the time, and an
  in-model policy's scoring runs inside the prefill), the decoder prefill and the greedy first token.
* **decode**: `decode_tokens` one-token steps through the pruned per-layer KV cache, each feeding the
  previous greedy token; no end-of-sequence stop, so every run decodes the same number of tokens.
  ``decode_ms_per_token`` is the decode time of a run / `decode_tokens`.

Each repeat is one full run (prefill, then decode); `warmup` untimed runs come first, and the
reported figures are medians over `repeats`. Memory is measured in one further, untimed run, so the
measurement never slows the timed ones:

* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the run (exact, tensors only).
* CPU: the C allocator's in-use bytes (glibc ``mallinfo2``) sampled every 0.2 ms by a thread, minus
  the value before the run (`memory.peak_memory_growth`); a lower bound, which on the testbed equals
  the exact allocation trace of ``torch.profiler`` (37.2 MB both, batch 8). ``memory_method`` names
  the method used.

KV-cache bytes are the engine's cache (``RunStats.kv_bytes``: keys and values of every layer that
ran, padding slots included) right after prefill and after the last decode step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..engine.runner import decode_step, prefill
from ..errors import VlmpruneError
from ..pruned_model import PrunedModel, resolve_prune
from ..memory import peak_memory_growth

@dataclass
class LatencyResult:
    prefill_ms: float  # median time to first token (vision tower + decision + prefill + first token)
    decode_ms_per_token: float  # median over runs of (decode time / decode_tokens)
    peak_memory_bytes: int  # peak memory growth during one run (see memory_method)
    memory_method: str  # how peak_memory_bytes was measured
    kv_bytes_prefill: int  # KV cache after prefill
    kv_bytes_decoded: int  # KV cache after the last decode step
    batch_size: int
    prompt_tokens: int  # padded prompt length of the batch
    decode_tokens: int
    repeats: int
    warmup: int
    device: str
    attn_implementation: str
    threads: int  # torch CPU threads during the runs
    prefill_ms_runs: list[float] = field(default_factory=list)
    decode_ms_per_token_runs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(
    pm: PrunedModel,
    inputs: dict[str, torch.Tensor],
    prune: Any = None,
    decode_tokens: int = 8,
    repeats: int = 5,
    warmup: int = 1,
) -> LatencyResult:
    """Median prefill and per-token decode times, peak memory and KV-cache bytes of one batch.

    `inputs`: the model's inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...), best
    already on the model's input device (`PrunedModel.input_device`; they are moved there otherwise). `prune`: anything ``pm(...)`` takes. See the module docstring for what is timed.
    """
    if repeats < 1 or warmup < 0 or decode_tokens < 1:
        raise VlmpruneError(f"need repeats >= 1, warmup >= 0 and decode_tokens >= 1; got {repeats}, {warmup}, {decode_tokens}")
    input_ids = inputs["input_ids"]
    limit = getattr(pm.adapter.text_config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] + decode_tokens + 1 > limit:
        raise VlmpruneError(f"prompt length {input_ids.shape[1]} + {decode_tokens + 1} new tokens exceeds the model's {limit} positions")
    device = pm.input_device  # inputs elsewhere are moved there
    sync = _synchronizer(pm)
    prefill_ms, decode_ms, kv = [], [], (0, 0)
    for i in range(warmup + repeats):
        run = _run(pm, inputs, prune, decode_tokens, sync)
        if i >= warmup:
            prefill_ms.append(run.prefill_s * 1e3)
            decode_ms.append(run.decode_s * 1e3 / decode_tokens)
            kv = (run.kv_prefill, run.kv_decoded)
        del run  # free this run's KV cache before the next one
    result, peak, method = peak_memory_growth(lambda: _run(pm, inputs, prune, decode_tokens, sync), device)
    del result
    return LatencyResult(
        prefill_ms=statistics.median(prefill_ms),
        decode_ms_per_token=statistics.median(decode_ms),
        peak_memory_bytes=peak,
        memory_method=method,
        kv_bytes_prefill=kv[0],
        kv_bytes_decoded=kv[1],
        batch_size=input_ids.shape[0],
        prompt_tokens=input_ids.shape[1],
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        device=str(device),
        attn_implementation=pm.adapter.attn_implementation,
        threads=torch.get_num_threads(),
        prefill_ms_runs=prefill_ms,
        decode_ms_per_token_runs=decode_ms,
    )


def prefill_seconds(pm: PrunedModel, inputs: dict[str, torch.Tensor], prune: Any = None) -> float:
    """Time to first token of one run, as `measure_latency` times its prefill (for a caller that
    interleaves the runs of several settings, so drift hits each alike)."""
    return _run(pm, inputs, prune, 0, _synchronizer(pm)).prefill_s


def _synchronizer(pm: PrunedModel) -> Callable[[], None]:
    """Waits for every GPU the model lives on (a device_map may split it over several); a no-op on the CPU."""
    gpus = [d for d in pm.devices if d.type == "cuda"]

    def sync() -> None:
        for gpu in gpus:
            torch.cuda.synchronize(gpu)

    return sync


@dataclass
class _Run:
    prefill_s: float
    decode_s: float
    kv_prefill: int
    kv_decoded: int
    cache: Any  # kept alive until the caller drops the run, so the memory pass sees the final cache


@torch.no_grad()
def _run(pm: PrunedModel, inputs: dict, prune: Any, decode_tokens: int, sync: Callable[[], None]) -> _Run:
    """One greedy run, as `PrunedModel.generate` does it, with the prefill and decode phases timed apart."""
    inputs = pm.to_input_device(inputs)  # (a no-op for inputs already there: not a cost of the model)
    sync()
    t0 = time.perf_counter()
    prep, prune, _ = pm.prepare_for(prune, **inputs)  # a method that re-encodes the images does so here, timed
    plan, policies = resolve_prune(prune, pm, prep)
    res = prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)
    token = res.last_logits.argmax(-1)  # [B]
    sync()
    t1 = time.perf_counter()
    kv_prefill = res.cache.nbytes()
    positions = res.next_position.clone()
    for _ in range(decode_tokens):
        logits = decode_step(pm.adapter, res.cache, token, positions)
        token = logits.argmax(-1)
        positions += 1
    sync()
    t2 = time.perf_counter()
    return _Run(t1 - t0, t2 - t1, kv_prefill, res.cache.nbytes(), res.cache)


