"""PAR on the testbed: accuracy at matched FLOPs against every training-free method, the
preference-vs-distillation ablation, and the measured prefill speed-up of PAR plans.

    python benchmarks/par.py                         # trains runs/par and runs/par_distill if absent
    python benchmarks/par.py --limit 500 --shares 0.5

Every method runs through `vlmprune.AtFlops(method, share)`: the budget whose priced share of the
full LM prefill (the router's own FLOPs and the in-model methods' scoring included) is closest to the
target. In-model methods (FastV, PDrop, SparseVLM) cannot go below the cost of their first layers
over every token; the table shows the share each method reached, and a comparison counts only
methods within 3% of the target share. PAR hybrid runs with 3, 4 or 5 of the 6 layers, whichever
scores best on 500 held-out *training-distribution* scenes (never the evaluation set), with the
visual-token budget chosen by the FLOPs target. Writes benchmarks/results/par.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import vlmprune
from vlmprune.eval.latency import measure_latency
from vlmprune.eval.vqa import evaluate
from vlmprune.files import write_json
from vlmprune.methods.base import layer_count
from vlmprune.methods.par import PAR, PARLayers, PARTokens, RouterTrainConfig, train_router
from vlmprune.methods.par.train import LAYER_BUDGETS, TOKEN_BUDGETS
from vlmprune.testbed import data, eval_set
from vlmprune.testbed.encode import encode, encode_batches

BASELINES = ("fastv", "pdrop", "sparsevlm", "visionzip", "random", "pool", "shortgpt", "random-layers")
HYBRID_LAYERS = (3 / 6, 4 / 6, 5 / 6)
SEEN_TOKENS = TOKEN_BUDGETS[::2]  # token shares the router trains on (0.1, 0.3, ...)
UNSEEN_TOKENS = (0.05, 0.15, 0.35, 0.55, 0.75)  # ... and shares between or below them
LAYER_COUNTS = (1, 2, 3, 4, 5)  # of 6
VALIDATION_SEED = 31_337
MATCH = 0.03


def ensure_router(path: Path, loss: str, steps: int) -> Path:
    if not (path / "router.json").is_file():
        record = train_router(RouterTrainConfig(out=str(path), loss=loss, steps=steps))
        print(f"trained {path} ({loss}) in {record['seconds'] / 60:.1f} min", flush=True)
    return path


def baseline(pm, name: str, calib):
    method = vlmprune.build_method(name, **({"keep_layers": 1} if name in ("shortgpt", "random-layers") else {}))
    return method.calibrate(pm, calib) if hasattr(method, "calibrate") else method


def run_point(pm, samples, method, share: float) -> dict:
    prune = None if method is None else vlmprune.AtFlops(method, share)
    start = time.perf_counter()
    res = evaluate(pm, samples, prune=prune, progress=False)
    return dict(accuracy=res.accuracy, per_type=res.per_type, share=res.lm_share, layers_run=res.layers_run,
                visual_tokens_kept=res.visual_tokens_kept, seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="runs/par")
    parser.add_argument("--distill-router", default="runs/par_distill", help="'' to skip the ablation")
    parser.add_argument("--steps", type=int, default=400, help="training steps for routers that do not exist yet")
    parser.add_argument("--shares", default="0.6,0.5,0.3")
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--budget-questions", type=int, default=1000, help="questions for the seen-vs-unseen budget table")
    parser.add_argument("--json", default="benchmarks/results/par.json")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    router = ensure_router(Path(args.router), "preference", args.steps)
    distill = ensure_router(Path(args.distill_router), "distill", args.steps) if args.distill_router else None

    pm = vlmprune.load("testbed")
    samples = eval_set(args.limit)
    validation = data.generate(500, "train", seed=VALIDATION_SEED)
    calib = encode_batches(data.generate(64, "train", seed=12345), pm.processor.tokenizer)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    key = dict(router=str(router), limit=args.limit)  # the distillation points join when that router exists
    if result.get("key") != key:
        result = dict(key=key, points={})
    points = result["points"]
    result["n_layers"] = pm.n_layers

    def point(name: str, share: float, method) -> dict:
        tag = f"{name} @ {share:g}"
        if tag not in points:
            points[tag] = dict(method=name, target=share, **run_point(pm, samples, method, share))
            write_json(path, result)
            p = points[tag]
            print(f"{tag}: {p['accuracy'] * 100:.1f}% at share {p['share'] or 1:.3f}", flush=True)
        return points[tag]

    point("full", 1.0, None)
    for share in shares:
        layers = max(HYBRID_LAYERS, key=lambda l: evaluate(pm, validation, prune=vlmprune.AtFlops(PAR.load(router, layers=l), share), progress=False).accuracy)
        result.setdefault("hybrid_layers", {})[f"{share:g}"] = layers
        point("par", share, PAR.load(router, layers=layers))
        point("par-tokens", share, PARTokens(router=str(router)))
        point("par-layers", share, PARLayers(router=str(router), keep_layers=6))
        if distill is not None:
            point("par (distill)", share, PAR.load(distill, layers=layers))
        for name in BASELINES:
            point(name, share, baseline(pm, name, calib))

    # budgets seen in training vs others: token-only PAR against random at the same token share,
    # layer-only PAR against ShortGPT at the same layer count
    subset = samples[: args.budget_questions]
    if result.get("budget_questions") != args.budget_questions:
        result["budget_questions"], result["budgets"] = args.budget_questions, {}
    budgets = result["budgets"]

    def budget_point(tag: str, method) -> float:
        if tag not in budgets:
            budgets[tag] = evaluate(pm, subset, prune=method, progress=False).accuracy
            write_json(path, result)
        return budgets[tag]

    for keep in sorted(SEEN_TOKENS + UNSEEN_TOKENS):
        budget_point(f"par-tokens keep {keep:g}", PARTokens(router=str(router), keep=keep))
        budget_point(f"random keep {keep:g}", vlmprune.build_method("random", keep=keep))
    shortgpt = baseline(pm, "shortgpt", calib)
    for n in LAYER_COUNTS:
        budget_point(f"par-layers {n}", PARLayers(router=str(router), keep_layers=n))
        budget_point(f"shortgpt {n}", dataclasses.replace(shortgpt, keep_layers=n))

    # measured prefill speed-up of PAR hybrid plans next to their FLOPs share (batch 32, sdpa)
    inputs = encode(samples[:32], pm.processor.tokenizer)
    full_ms = measure_latency(pm, inputs, decode_tokens=1, repeats=7).prefill_ms
    speed = {}
    for share in shares:
        method = vlmprune.AtFlops(PAR.load(router, layers=result["hybrid_layers"][f"{share:g}"]), share)
        lat = measure_latency(pm, inputs, prune=method, decode_tokens=1, repeats=7)
        speed[f"{share:g}"] = dict(prefill_ms=lat.prefill_ms, full_ms=full_ms, speedup=full_ms / lat.prefill_ms,
                                   flops_share=points[f"par @ {share:g}"]["share"])
    result["latency"] = speed
    write_json(path, result)
    print(report(result, shares))


def report(result: dict, shares: list[float]) -> str:
    points = result["points"]
    names = sorted({p["method"] for p in points.values()} - {"full"}, key=lambda n: (not n.startswith("par"), n))
    full = points["full @ 1"]["accuracy"]
    lines = [f"full model: {full * 100:.1f}%", "| method | " + " | ".join(f"{s:g} FLOPs" for s in shares) + " |",
             "|---|" + "---:|" * len(shares)]
    for name in names:
        cells = []
        for s in shares:
            p = points.get(f"{name} @ {s:g}")
            cells.append("" if p is None else f"{p['accuracy'] * 100:.1f} ({p['share']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in shares:
        par = points[f"par @ {s:g}"]
        matched = [(p["accuracy"], n) for n in BASELINES if (p := points.get(f"{n} @ {s:g}")) and abs(p["share"] - s) <= MATCH]
        best = max(matched) if matched else None
        tokens = points.get(f"par-tokens @ {s:g}")
        line = f"share {s:g}: PAR hybrid {par['accuracy'] * 100:.1f}% (share {par['share']:.3f}, {result['hybrid_layers'][f'{s:g}'] * result['n_layers']:.0f} layers)"
        if best:
            line += f"; best matched training-free {best[1]} {best[0] * 100:.1f}% -> {(par['accuracy'] - best[0]) * 100:+.1f} points"
        if tokens:
            line += f"; PAR token-only {tokens['accuracy'] * 100:.1f}%"
        line += f"; {par['accuracy'] / full * 100:.1f}% of full"
        lat = result.get("latency", {}).get(f"{s:g}")
        if lat:
            line += f"; prefill {lat['prefill_ms']:.1f} ms vs {lat['full_ms']:.1f} ms = {lat['speedup']:.2f}x"
        lines.append(line)
    budgets = result.get("budgets", {})
    if budgets:
        lines += ["", f"budgets seen in training (*) and others, first {result.get('budget_questions')} questions:",
                  "| token share | par-tokens | random | gap |", "|---:|---:|---:|---:|"]
        for keep in sorted(SEEN_TOKENS + UNSEEN_TOKENS):
            a, r = budgets.get(f"par-tokens keep {keep:g}"), budgets.get(f"random keep {keep:g}")
            if a is not None and r is not None:
                lines.append(f"| {keep:g}{'*' if keep in TOKEN_BUDGETS else ''} | {a * 100:.1f} | {r * 100:.1f} | {(a - r) * 100:+.1f} |")
        lines += ["", "| layers kept | par-layers | shortgpt | gap |", "|---:|---:|---:|---:|"]
        seen_layers = {layer_count(share, result["n_layers"]) for share in (*LAYER_BUDGETS, RouterTrainConfig("").layers)}
        for n in LAYER_COUNTS:
            a, r = budgets.get(f"par-layers {n}"), budgets.get(f"shortgpt {n}")
            if a is not None and r is not None:
                lines.append(f"| {n}{'*' if n in seen_layers else ''} | {a * 100:.1f} | {r * 100:.1f} | {(a - r) * 100:+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
