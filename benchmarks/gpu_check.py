"""GPU check: the engine on real hardware, in bf16, within a few minutes on one GPU.

  (a) equivalence: each family's random-weight model (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) on
      the GPU in bf16 (and float32), unpruned, against transformers' own forward and greedy generate on
      the same device: max |logit difference| (also relative to the largest logit) and greedy-token
      agreement. Then the same models split: (i) decoder layers and the LM head moved to the CPU by hand
      (no hooks: the engine moves each layer's inputs), (ii) loaded with `vlmprune.load(device_map=...)`
      that CPU-offloads one layer and disk-offloads another (accelerate hooks), both unpruned and under
      FastV + a layer skip, against the unsplit model.
  (b) prefill time of a LLaVA-1.5-7B-shaped language model (random weights, Llama: 32 layers, hidden
      4096, MLP 11008, 32 heads, bf16; 576 visual + 64 text tokens per sample, a tiny CLIP tower outside
      the timed region) for the full model, FastV K=2 keeping 25% and 2 of 32 layers skipped, each
      speed-up beside the one its FLOPs predict (`vlmprune.flops`); transformers' forward for scale; and
      the host synchronisations one prefill makes (`torch.cuda.set_sync_debug_mode`).
  (c) decode tokens/s through the full and the pruned KV caches, and peak memory
      (`torch.cuda.max_memory_allocated`) of each run.
  (d) 2:4 sparsity that runs faster: the same LM with random 2:4 weights in every decoder linear, as a
      masked dense model and with `vlmprune.weights.semi_structured` kernels (cuSPARSELt / CUTLASS):
      prefill ms, decode tokens/s, and the logits' agreement within bf16 tolerance. Off CUDA nothing is
      converted (the notice is recorded) and both rows time the same dense model.

Prints a table and writes docs/gpu_check.json (temporary file, then rename) with the date, the GPU's
name and the torch version.

    python benchmarks/gpu_check.py                      # on a CUDA machine (H200: ~2 minutes)
    python benchmarks/gpu_check.py --smoke --device cpu # tiny sizes, any machine, seconds
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

import vlmprune
from vlmprune.engine.runner import decode_step, prefill
from vlmprune.files import write_json
from vlmprune.pruned_model import resolve_prune

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
VOCAB, IMAGE, VIDEO, VISION_START = 512, 500, 501, 502
TOLERANCE = {torch.bfloat16: 0.02, torch.float32: 1e-4}  # max |diff| / max |logit| allowed
SPLIT_ATOL = {"by hand (CPU layers)": 1e-3, "device_map offload": 1e-4}  # float32; CPU vs GPU kernels differ slightly
GREEDY_AGREEMENT = 0.75  # share of greedy tokens that must match (bf16 may break a near tie late)

FULL = dict(families=FAMILIES, split_families=FAMILIES, dtypes=("bfloat16", "float32"), eq_hidden=256, eq_layers=4,
            eq_heads=8, eq_steps=16, layers=32, hidden=4096, ffn=11008, heads=32, vocab=32064, image=336, text=64, batch=16,
            repeats=5, decode_steps=64, decode_repeats=3, speed_dtype="bfloat16")
SMOKE = dict(families=("llava_next", "qwen2_5_vl"), split_families=("qwen2_5_vl",), dtypes=("float32",), eq_hidden=64,
             eq_layers=4, eq_heads=4, eq_steps=3, layers=4, hidden=128, ffn=256, heads=4, vocab=1000, image=28, text=8,
             batch=2, repeats=1, decode_steps=4, decode_repeats=1, speed_dtype="float32")  # CPU bf16 matmuls are slow


# ----------------------------------------------------------------------------- tiny models of every family
def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_vlm(family: str, hidden: int, layers: int, heads: int, seed: int = 0):
    """A random-weight model of `family` (float32, CPU) with a small vision tower, like tests/conftest.py."""
    torch.manual_seed(seed)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), vocab_size=VOCAB, max_position_embeddings=2048,
                initializer_range=0.1, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=7, num_channels=3, projection_dim=32)
    qwen_vision = dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    rope = dict(rope_type="default", mrope_section=_mrope(hidden // heads), rope_theta=10000.0)
    if family == "llava":
        cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**clip),
                                       text_config=transformers.LlamaConfig(**text), image_token_id=IMAGE,
                                       vision_feature_layer=-1)
        cls = transformers.LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = transformers.LlavaNextConfig(vision_config=transformers.CLIPVisionConfig(**clip),
                                           text_config=transformers.LlamaConfig(**text), image_token_id=IMAGE,
                                           vision_feature_layer=-1, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
        cls = transformers.LlavaNextForConditionalGeneration
    elif family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, **qwen_vision),
                                         text_config=dict(text, rope_parameters=rope), image_token_id=IMAGE,
                                         video_token_id=VIDEO, vision_start_token_id=VISION_START)
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        cfg = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=4,
                               fullatt_block_indexes=[1], window_size=56, **qwen_vision),
            text_config=dict(text, rope_parameters=rope), image_token_id=IMAGE, video_token_id=VIDEO,
            vision_start_token_id=VISION_START)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_batch(family: str, model, prefix=(3, 6, 1), suffix=(4, 2, 7), seed: int = 0) -> dict:
    """A left-padded batch, one image per sample (CPU tensors): the model's inputs."""
    gen = torch.Generator().manual_seed(seed)
    n = len(prefix)
    if family == "llava":
        vision, counts = {"pixel_values": torch.randn(n, 3, 28, 28, generator=gen)}, [16] * n
    elif family == "llava_next":
        sizes = torch.tensor([[30, 50], [56, 56], [50, 28]][:n])
        pix = torch.randn(n, 5, 3, 28, 28, generator=gen)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pix, image_sizes=sizes, return_dict=True).pooler_output
        vision, counts = {"pixel_values": pix, "image_sizes": sizes}, [f.shape[0] for f in feats]
    else:
        grid = torch.tensor([[[1, 8, 8], [1, 8, 12], [1, 12, 8]][i % 3] for i in range(n)])
        pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen)
        vision, counts = {"pixel_values": pix, "image_grid_thw": grid}, (grid.prod(-1) // 4).tolist()
    rows = [[2] + torch.randint(3, 450, (p,), generator=gen).tolist() + [IMAGE] * c + torch.randint(3, 450, (s,), generator=gen).tolist()
            for p, s, c in zip(prefix, suffix, counts)]
    length = max(map(len, rows))
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row)
        mask[b, length - len(row):] = 1
    return dict(input_ids=ids, attention_mask=mask, **vision)


def _hf_inputs(family: str, inputs: dict, for_generate: bool = False) -> dict:
    kw = dict(inputs)
    if family.startswith("qwen"):
        kw["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).int()
    elif not for_generate:
        kw["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return kw


def _on(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _agreement(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(share of generated tokens inside each sample's matching prefix, share of samples fully equal)."""
    same = (ours == ref).long()
    prefix = same.cumprod(1).sum(1).float() / same.shape[1]
    return float(prefix.mean()), float(same.all(1).float().mean())


# ----------------------------------------------------------------------------- (a) equivalence
@torch.no_grad()
def equivalence(sizes: dict, device: torch.device) -> list[dict]:
    rows = []
    for family in sizes["families"]:
        base = tiny_vlm(family, sizes["eq_hidden"], sizes["eq_layers"], sizes["eq_heads"])
        inputs_cpu = tiny_batch(family, base)
        for dtype in (getattr(torch, name) for name in sizes["dtypes"]):
            model = tiny_vlm(family, sizes["eq_hidden"], sizes["eq_layers"], sizes["eq_heads"]).to(device, dtype)
            inputs = _on(inputs_cpu, device)
            valid = inputs["attention_mask"].bool()
            ref = model(**_hf_inputs(family, inputs)).logits.float()
            pm = vlmprune.wrap(model)
            ours = pm(**inputs).logits.float()
            diff = float((ours[valid] - ref[valid]).abs().max())
            scale = float(ref[valid].abs().max())
            steps = sizes["eq_steps"]
            ref_ids = model.generate(**_hf_inputs(family, inputs, for_generate=True), max_new_tokens=steps, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[:, -steps:]
            our_ids = pm.generate(**inputs, max_new_tokens=steps, eos_token_id=())[:, -steps:]
            agree, exact = _agreement(our_ids.cpu(), ref_ids.cpu())
            rows.append(dict(family=family, dtype=str(dtype).removeprefix("torch."), max_abs_logit_diff=diff, max_abs_logit=scale,
                             relative_diff=diff / max(scale, 1e-9), greedy_agreement=agree, greedy_exact_share=exact,
                             passed=diff <= TOLERANCE[dtype] * max(scale, 1.0) and agree >= GREEDY_AGREEMENT))
            del model, pm
    return rows


def _split_decisions():
    return {"none": lambda: None, "fastv K=2 25% + skip 3": lambda: [vlmprune.FastV(layer=2, keep=0.25), vlmprune.Plan(skip=[3])]}


def _device_map(model, main, cpu_layers=(1,), disk_layers=(2,)) -> dict:
    """Every module on `main` except some decoder layers on the CPU / disk, and the LM head on the CPU."""
    out = {}
    for name, child in model.model.named_children():
        if name != "language_model":
            out[f"model.{name}"] = main
            continue
        for sub, module in child.named_children():
            if sub != "layers":
                out[f"model.language_model.{sub}"] = main
                continue
            for i in range(len(module)):
                out[f"model.language_model.layers.{i}"] = "cpu" if i in cpu_layers else "disk" if i in disk_layers else main
    out.update({f"model.{name}": main for name, _ in model.model.named_parameters(recurse=False)})
    out["lm_head"] = "cpu"
    return out


@torch.no_grad()
def split(sizes: dict, device: torch.device) -> list[dict]:
    """Split models (float32) against the unsplit one on `device`."""
    rows = []
    for family in sizes["split_families"]:
        model = tiny_vlm(family, sizes["eq_hidden"], sizes["eq_layers"], sizes["eq_heads"])
        inputs = tiny_batch(family, model)
        steps = sizes["eq_steps"]
        ways = {}
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            ref = vlmprune.load(tmp, device=str(device))
            main = (device.index or 0) if device.type == "cuda" else "cpu"
            ways["device_map offload"] = vlmprune.load(tmp, device_map=_device_map(ref.model, main), offload_folder=Path(tmp) / "offload")
            if device.type == "cuda":  # a true split over two devices, no hooks: layers 1 and 3 and the head on the CPU
                moved = tiny_vlm(family, sizes["eq_hidden"], sizes["eq_layers"], sizes["eq_heads"]).to(device)  # = the saved weights
                for i in (1, 3):
                    moved.model.language_model.layers[i].to("cpu")
                moved.lm_head.to("cpu")
                ways["by hand (CPU layers)"] = vlmprune.wrap(moved)
            for how, pm in ways.items():
                for name, decision in _split_decisions().items():
                    want = ref(**inputs, prune=decision())
                    got = pm(**inputs, prune=decision())
                    valid = want.token_index >= 0
                    same_layout = torch.equal(got.token_index.cpu(), want.token_index.cpu())
                    diff = float((got.logits[valid] - want.logits[valid]).abs().max()) if same_layout else float("inf")
                    want_ids = ref.generate(**inputs, prune=decision(), max_new_tokens=steps, eos_token_id=())[:, -steps:]
                    got_ids = pm.generate(**inputs, prune=decision(), max_new_tokens=steps, eos_token_id=())[:, -steps:]
                    agree, exact = _agreement(got_ids.cpu(), want_ids.cpu())
                    rows.append(dict(family=family, split=how, prune=name, devices=[str(d) for d in pm.devices],
                                     max_abs_logit_diff=diff, greedy_agreement=agree, greedy_exact_share=exact,
                                     passed=same_layout and diff <= SPLIT_ATOL[how] and exact == 1.0))
            del ways, ref
    return rows


# ----------------------------------------------------------------------------- (b), (c) LLaVA-1.5-7B-shaped
def llava_7b_shaped(sizes: dict, device: torch.device, dtype: torch.dtype):
    """Random weights built on the device directly; a tiny CLIP tower (576 patches of 14 px at 336 px)."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=sizes["image"], patch_size=14 if sizes["image"] % 14 == 0 else 7,
                                           projection_dim=64)
    text = transformers.LlamaConfig(hidden_size=sizes["hidden"], intermediate_size=sizes["ffn"], num_hidden_layers=sizes["layers"],
                                    num_attention_heads=sizes["heads"], num_key_value_heads=sizes["heads"], vocab_size=sizes["vocab"],
                                    max_position_embeddings=4096, rms_norm_eps=1e-5)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=sizes["vocab"] - 64,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _inputs_7b(model, sizes: dict, device: torch.device) -> dict:
    cfg = model.config
    n_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    half = sizes["text"] // 2
    rows = [torch.cat([torch.tensor([1]), torch.randint(3, cfg.image_token_id, (half - 1,), generator=gen),
                       torch.full((n_visual,), cfg.image_token_id), torch.randint(3, cfg.image_token_id, (sizes["text"] - half,), generator=gen)])
            for _ in range(sizes["batch"])]
    ids = torch.stack(rows)
    side = cfg.vision_config.image_size
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=torch.randn(sizes["batch"], 3, side, side, generator=gen).to(device, model.dtype))


class Clock:
    def __init__(self, device: torch.device):
        self.gpus = [device] if device.type == "cuda" else []

    def sync(self) -> None:
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def _count_syncs(device: torch.device, fn) -> int | None:
    """Host synchronisations `fn` makes on CUDA (torch's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


@torch.no_grad()
def speed(sizes: dict, device: torch.device, dtype: torch.dtype) -> dict:
    model = llava_7b_shaped(sizes, device, dtype)
    pm = vlmprune.wrap(model)
    inputs = _inputs_7b(model, sizes, device)
    prep = pm.prepare(**inputs)
    n_layers = pm.n_layers
    skip = [n_layers - 3, n_layers - 2]
    decisions = {"full": vlmprune.Plan(), "fastv K=2 keep 25%": vlmprune.FastV(layer=2, keep=0.25),
                 f"skip 2/{n_layers} layers {skip}": vlmprune.Plan(skip=skip)}
    resolved = {name: resolve_prune(d, pm, prep) for name, d in decisions.items()}
    clock = Clock(device)
    runners = {"transformers forward": lambda: model(inputs_embeds=prep.inputs_embeds, attention_mask=inputs["attention_mask"],
                                                     logits_to_keep=1)}
    for name, (plan, policies) in resolved.items():
        runners[name] = lambda plan=plan, policies=policies: prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)
    for fn in runners.values():  # warm-up (kernels, allocator)
        fn()
    times = {name: [] for name in runners}
    for _ in range(sizes["repeats"]):  # interleaved, so drift hits every setting alike
        for name, fn in runners.items():
            times[name].append(clock.time(fn))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    costs = {}
    for name, (plan, policies) in resolved.items():
        report = vlmprune.flops(pm, prefill(pm.adapter, prep, plan, policies, logits_to_keep=1).stats, vision=False)
        costs[name] = float((report.lm_prefill + report.lm_head + report.scoring).sum())
    full_name = "full"
    prefill_rows = []
    for name in resolved:
        predicted = costs[full_name] / costs[name]
        measured = ms[full_name] / ms[name]
        prefill_rows.append(dict(setting=name, prefill_ms=ms[name], flops_share=costs[name] / costs[full_name],
                                 predicted_speedup=predicted, measured_speedup=measured, measured_over_predicted=measured / predicted))

    syncs = {name: _count_syncs(device, fn) for name, fn in runners.items() if name != "transformers forward"}

    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    decode_rows = []
    steps = sizes["decode_steps"]
    for name, (plan, policies) in resolved.items():
        rates, peaks = [], []
        for _ in range(sizes["decode_repeats"]):
            if device.type == "cuda":
                clock.sync()
                torch.cuda.reset_peak_memory_stats(device)
            res = prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)
            token = res.last_logits.argmax(-1)
            positions = res.next_position.clone()
            kv_prefill = res.cache.nbytes()

            def decode(res=res):
                nonlocal token
                for _ in range(steps):
                    token = decode_step(pm.adapter, res.cache, token, positions).argmax(-1)
                    positions.add_(1)

            seconds = clock.time(decode)
            rates.append(sizes["batch"] * steps / seconds)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
            del res
        decode_syncs = None
        if device.type == "cuda":
            res = prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)
            tok = res.last_logits.argmax(-1)
            decode_syncs = _count_syncs(device, lambda: decode_step(pm.adapter, res.cache, tok, res.next_position.clone()))
            del res
        decode_rows.append(dict(setting=name, tokens_per_s=statistics.median(rates), decode_steps=steps, batch=sizes["batch"],
                                kv_gib_after_prefill=kv_prefill / 2**30,
                                peak_memory_gib=None if peaks[0] is None else max(peaks) / 2**30,
                                peak_over_weights_gib=None if peaks[0] is None else max(peaks) / 2**30 - weights_gib,
                                syncs_per_decode_step=decode_syncs))
    skip_name = list(resolved)[2]
    out = dict(shape=dict(layers=n_layers, hidden=sizes["hidden"], ffn=sizes["ffn"], heads=sizes["heads"], vocab=sizes["vocab"],
                          visual_tokens=prep.n_visual[0], text_tokens=sizes["text"], batch=sizes["batch"], dtype=str(dtype)),
               weights_gib=weights_gib, transformers_prefill_ms=ms["transformers forward"],
               engine_overhead=ms[full_name] / ms["transformers forward"] - 1, prefill=prefill_rows, decode=decode_rows,
               syncs_per_prefill=syncs,
               # skipping 2 layers must not change the count: nothing in the layer loop reads back to the host
               per_layer_sync_free=None if syncs[full_name] is None else syncs[full_name] == syncs[skip_name])
    del model, pm, prep
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _mask_two_four(model: torch.nn.Module, seed: int = 0) -> int:
    """Zero 2 of every 4 input columns (random positions) in every decoder linear; how many linears."""
    from vlmprune.weights import Pattern, select_keep

    gen = torch.Generator().manual_seed(seed)
    linears = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:  # the lowest of random scores: a random 2:4 mask
        keep = select_keep(torch.rand(module.weight.shape, generator=gen), Pattern(nm="2:4"))
        module.weight.data.mul_(keep.to(module.weight.device))
    return len(linears)


@torch.no_grad()
def sparse24(sizes: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """(d) the same LLaVA-1.5-7B-shaped LM with random 2:4 weights: masked dense against
    `vlmprune.weights.semi_structured` kernels, prefill ms and decode tokens/s, and the logits' agreement."""
    from vlmprune.weights.semi_structured import to_semi_structured

    model = llava_7b_shaped(sizes, device, dtype)
    masked = _mask_two_four(model)
    pm = vlmprune.wrap(model)
    prep = pm.prepare(**_inputs_7b(model, sizes, device))
    plan, policies = resolve_prune(vlmprune.Plan(), pm, prep)
    clock, steps = Clock(device), sizes["decode_steps"]

    def run() -> dict:
        prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)  # warm-up
        ms = statistics.median(clock.time(lambda: prefill(pm.adapter, prep, plan, policies, logits_to_keep=1))
                               for _ in range(sizes["repeats"])) * 1e3
        res = prefill(pm.adapter, prep, plan, policies, logits_to_keep=1)
        logits, token, positions, tokens = res.last_logits.float(), res.last_logits.argmax(-1), res.next_position.clone(), []

        def decode():
            nonlocal token
            for _ in range(steps):
                token = decode_step(pm.adapter, res.cache, token, positions).argmax(-1)
                tokens.append(token)
                positions.add_(1)

        seconds = clock.time(decode)
        return dict(prefill_ms=ms, tokens_per_s=sizes["batch"] * steps / seconds, logits=logits, tokens=torch.stack(tokens, -1))

    dense = run()
    report = to_semi_structured(model, notify=False)  # off CUDA: report.notice says why nothing changed
    sparse = run()
    diff = float((sparse["logits"] - dense["logits"]).abs().max())
    scale = float(dense["logits"].abs().max())
    ok = diff <= TOLERANCE[torch.bfloat16] * scale
    out = dict(masked_linears=masked, converted_linears=len(report.converted), skipped=report.skipped,
               notice=report.notice, dtype=str(dtype),
               dense_prefill_ms=dense["prefill_ms"], sparse_prefill_ms=sparse["prefill_ms"],
               prefill_speedup=dense["prefill_ms"] / sparse["prefill_ms"],
               dense_tokens_per_s=dense["tokens_per_s"], sparse_tokens_per_s=sparse["tokens_per_s"],
               decode_speedup=sparse["tokens_per_s"] / dense["tokens_per_s"],
               max_abs_logit_diff=diff, max_abs_logit=scale,
               first_token_agreement=float((sparse["tokens"][:, 0] == dense["tokens"][:, 0]).float().mean()),
               greedy_agreement=float((sparse["tokens"] == dense["tokens"]).float().mean()), passed=ok)
    del model, pm, prep
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- report
def _print(result: dict) -> None:
    print(f"{result['gpu']} | torch {result['torch']} | transformers {result['transformers']} | {result['date']}")
    print("\n(a) equivalence with transformers on the same device")
    print("| family     | dtype    | max |diff| | max |logit| | greedy agreement | exact | pass |")
    print("|------------|----------|-----------:|------------:|-----------------:|------:|------|")
    for r in result["equivalence"]:
        print(f"| {r['family']:<10} | {r['dtype']:<8} | {r['max_abs_logit_diff']:10.2e} | {r['max_abs_logit']:11.3f} | "
              f"{r['greedy_agreement']:16.3f} | {r['greedy_exact_share']:5.2f} | {'yes' if r['passed'] else 'NO'}  |")
    print("\n(a) split models against the unsplit one (float32)")
    print("| family     | split                 | prune                  | max |diff| | greedy agreement | pass |")
    print("|------------|-----------------------|------------------------|-----------:|-----------------:|------|")
    for r in result["split"]:
        print(f"| {r['family']:<10} | {r['split']:<21} | {r['prune']:<22} | {r['max_abs_logit_diff']:10.2e} | "
              f"{r['greedy_agreement']:16.3f} | {'yes' if r['passed'] else 'NO'}  |")
    s = result["speed"]
    shape = s["shape"]
    print(f"\n(b) prefill, LLaVA-1.5-7B-shaped LM ({shape['layers']} layers, hidden {shape['hidden']}, {shape['visual_tokens']} visual + "
          f"{shape['text_tokens']} text tokens, batch {shape['batch']}, {shape['dtype']}, {s['weights_gib']:.1f} GiB of weights); "
          f"transformers forward {s['transformers_prefill_ms']:.1f} ms, engine overhead {s['engine_overhead'] * 100:+.1f}%")
    print("| setting                      | prefill ms | FLOPs share | predicted x | measured x | meas/pred | syncs |")
    print("|------------------------------|-----------:|------------:|------------:|-----------:|----------:|------:|")
    for r in s["prefill"]:
        syncs = s["syncs_per_prefill"].get(r["setting"])
        print(f"| {r['setting']:<28} | {r['prefill_ms']:10.1f} | {r['flops_share']:11.3f} | {r['predicted_speedup']:11.2f} | "
              f"{r['measured_speedup']:10.2f} | {r['measured_over_predicted']:9.2f} | {'-' if syncs is None else syncs:>5} |")
    print("\n(c) decode")
    print("| setting                      | tokens/s | KV GiB | peak GiB | syncs/step |")
    print("|------------------------------|---------:|-------:|---------:|-----------:|")
    for r in s["decode"]:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        syncs = "-" if r["syncs_per_decode_step"] is None else r["syncs_per_decode_step"]
        print(f"| {r['setting']:<28} | {r['tokens_per_s']:8.1f} | {r['kv_gib_after_prefill']:6.2f} | {peak:>8} | {syncs:>10} |")
    print(f"\nno host synchronisation per layer (full and skip prefills make as many): {s['per_layer_sync_free']}")
    d = result["sparse24"]
    print(f"\n(d) 2:4 sparse kernels, the same LM with random 2:4 weights ({d['dtype']}): {d['converted_linears']} of "
          f"{d['masked_linears']} decoder linears converted" + (f" ({d['notice']})" if d["notice"] else ""))
    print("| model        | prefill ms | decode tokens/s |")
    print("|--------------|-----------:|----------------:|")
    print(f"| masked dense | {d['dense_prefill_ms']:10.1f} | {d['dense_tokens_per_s']:15.1f} |")
    print(f"| 2:4 kernels  | {d['sparse_prefill_ms']:10.1f} | {d['sparse_tokens_per_s']:15.1f} |")
    print(f"speed-up: prefill {d['prefill_speedup']:.2f}x, decode {d['decode_speedup']:.2f}x; logits max |diff| "
          f"{d['max_abs_logit_diff']:.2e} of max |logit| {d['max_abs_logit']:.2f} (pass: {'yes' if d['passed'] else 'NO'}); "
          f"greedy agreement {d['greedy_agreement']:.3f}")
    print(f"all equivalence, split and 2:4 checks passed: {result['passed']}  ({result['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, any device): checks the script itself")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default; the CPU only with --smoke)")
    parser.add_argument("--json", help="output file (default docs/gpu_check.json; benchmarks/results/gpu_check_smoke.json with --smoke)")
    parser.add_argument("--batch", type=int, help="batch size of (b) and (c) (default 16)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not args.smoke:
        print("gpu_check needs a CUDA GPU (none is visible); run with --smoke for tiny sizes on the CPU", file=sys.stderr)
        return 2
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.batch:
        sizes["batch"] = args.batch
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
                  device=str(device), torch=torch.__version__, transformers=transformers.__version__, smoke=args.smoke,
                  cuda=torch.version.cuda, sizes=sizes)
    result["equivalence"] = equivalence(sizes, device)
    result["split"] = split(sizes, device)
    result["speed"] = speed(sizes, device, getattr(torch, sizes["speed_dtype"]))
    result["sparse24"] = sparse24(sizes, device, getattr(torch, sizes["speed_dtype"]))
    result["passed"] = all(r["passed"] for r in result["equivalence"] + result["split"] + [result["sparse24"]])
    result["seconds"] = time.perf_counter() - start
    _print(result)
    out = write_json(args.json or ("benchmarks/results/gpu_check_smoke.json" if args.smoke else "docs/gpu_check.json"), result)
    print(f"-> {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
