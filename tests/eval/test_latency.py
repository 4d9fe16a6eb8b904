"""`measure_latency` on a tiny LLaVA: KV-cache bytes equal their closed form, the decode length is forced,
and the timings and memory are sane (timings are not asserted beyond being positive)."""

import threading
import time

import pytest
import torch

import vlmprune
from conftest import make_batch
from vlmprune.eval.latency import measure_latency


def _bytes_per_cached_token(model) -> int:
    """K and V of one token in one layer: 2 * Hkv * head_dim * element size."""
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def test_kv_bytes_equal_the_closed_form_and_values_are_sane(tiny_models):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [5], [6])
    length, n_vis = batch.input_ids.shape[1], batch.n_visual[0]
    kept = torch.arange(0, n_vis, 4)[None]  # 4 of 16 visual tokens survive from layer 2; layer 4 is skipped
    plan = vlmprune.Plan(keep={2: kept}, skip=[4])
    decode = 3
    lat = measure_latency(pm, batch.kwargs(), prune=plan, decode_tokens=decode, repeats=2, warmup=1)

    short = length - n_vis + kept.shape[1]
    entries = [length, length, short, short, 0, short]  # per layer, from the plan alone
    per_token = _bytes_per_cached_token(model)
    assert lat.kv_bytes_prefill == per_token * sum(entries)
    assert lat.kv_bytes_decoded == per_token * (sum(entries) + decode * 5)  # one entry per step in each of 5 run layers
    stats = pm(**batch.kwargs(), prune=plan).stats
    assert lat.kv_bytes_prefill == stats.kv_bytes == per_token * int(stats.kv_entries.sum())

    assert lat.prefill_ms > 0 and lat.decode_ms_per_token > 0
    assert len(lat.prefill_ms_runs) == len(lat.decode_ms_per_token_runs) == 2
    assert lat.batch_size == 1 and lat.prompt_tokens == length and lat.decode_tokens == decode
    assert lat.attn_implementation == "sdpa" and lat.device == "cpu"
    assert 0 < lat.peak_memory_bytes < 2**30
    if "mallinfo2" in lat.memory_method:  # allocator bytes: the final cache is alive when the run ends
        assert lat.peak_memory_bytes >= lat.kv_bytes_decoded
    assert set(lat.to_dict()) >= {"prefill_ms", "decode_ms_per_token", "peak_memory_bytes", "kv_bytes_prefill", "kv_bytes_decoded"}


def test_padded_batch_with_a_method(tiny_models):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3, 7], [6, 2])
    method = vlmprune.FastV(layer=2, keep=0.5)
    lat = measure_latency(pm, batch.kwargs(), prune=method, decode_tokens=4, repeats=1, warmup=0)
    assert lat.kv_bytes_prefill == pm(**batch.kwargs(), prune=method).stats.kv_bytes
    # every decode step appends one slot per sample to each of the 6 layers
    assert lat.kv_bytes_decoded - lat.kv_bytes_prefill == 4 * 2 * 6 * _bytes_per_cached_token(model)
    assert lat.batch_size == 2


def test_bad_arguments_are_refused(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [2])
    with pytest.raises(vlmprune.VlmpruneError, match="repeats >= 1"):
        measure_latency(vlmprune.wrap(model), batch.kwargs(), repeats=0)
    with pytest.raises(vlmprune.VlmpruneError, match="exceeds the model's 1024 positions"):
        measure_latency(vlmprune.wrap(model), batch.kwargs(), decode_tokens=2000)


def test_peak_memory_keeps_the_final_reading_when_the_sampler_lags(monkeypatch):
    """The sampler thread can be descheduled between a reading and recording it; the final reading,
    taken with the result alive, must still count, so the peak never falls below what the result holds
    (with one shared maximum the lagging sampler overwrote it: the flaky memory check above)."""
    from vlmprune import memory

    read, method = memory._cpu_reader()
    if "mallinfo2" not in method:
        pytest.skip("needs allocator bytes (glibc mallinfo2)")

    def lagging() -> int:  # a reading, then (in the sampler thread) a pause before it is recorded
        value = read()
        if threading.current_thread() is not threading.main_thread():
            time.sleep(1e-3)
        return value

    monkeypatch.setattr(memory, "_cpu_reader", lambda: (lagging, method))

    def run() -> torch.Tensor:
        time.sleep(3e-3)  # the sampler reads meanwhile
        return torch.empty(1 << 16, dtype=torch.uint8)  # 64 KiB, alive when the run ends

    for _ in range(8):
        held, peak, _ = memory.peak_memory_growth(run, torch.device("cpu"))
        assert peak >= held.nbytes, (peak, held.nbytes)
