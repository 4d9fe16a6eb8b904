"""PAR on the testbed: accuracy at matched FLOPs against every training-free method, the router's
token choice against a stratified random choice under the same tile rule, routers at different token
layers K, and the measured prefill speed-up of PAR plans. Every "beats" carries a paired bootstrap 95%
interval of the accuracy difference (same questions, 1000 resamples, seed 0).

    python benchmarks/par.py                                  # the shipped router (PAR.load("testbed"))
    python benchmarks/par.py --compare runs/par_k0,runs/par_k2 --limit 500

Every method of the main table runs through `vlmprune.AtFlops(method, share)`: the budget whose priced
share of the full LM prefill (the router's own FLOPs and the in-model methods' scoring included) is
closest to the target. In-model methods (FastV, PDrop, SparseVLM) and routers at K >= 1 cannot go below
the cost of their first layers over every token; the table shows the share each method reached, and a
comparison counts only methods within 3% of the target share. PAR hybrid runs with 3, 4 or 5 of the 6
layers, whichever scores best on 500 held-out *training-distribution* scenes (never the evaluation set).

The token table compares token-only PAR with, at the router's own token layer K and the same share of
visual tokens: `stratified-random` (the same tile rule with random scores, mean of seeds 0 and 1),
`random`, and the teacher's layer-1 attention (the last token's, from an extra unpruned pass: a
reference, not a method) under the same tile rule. Writes benchmarks/results/par.json; points are
cached there and a re-run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.data.calibration import CALIBRATION_SEED, scene_batches
from vlmprune.engine.plan import Plan
from vlmprune.eval.bootstrap import paired_bootstrap
from vlmprune.eval.latency import measure_latency
from vlmprune.eval.vqa import evaluate
from vlmprune.files import write_json
from vlmprune.methods.base import keep_count
from vlmprune.methods.par import PAR, PARLayers, PARTokens, load_router
from vlmprune.methods.par.flows import teacher_pass
from vlmprune.methods.tiles import balanced_scores
from vlmprune.testbed import data, eval_set
from vlmprune.testbed.encode import encode

BASELINES = ("fastv", "pdrop", "sparsevlm", "visionzip", "random", "stratified-random", "pool", "shortgpt", "random-layers")
HYBRID_LAYERS = (3 / 6, 4 / 6, 5 / 6)
TOKEN_SHARES = (0.05, 0.1, 0.3, 0.5)  # the token table, for the main router
TARGET_SHARES = (0.1, 0.3)  # the token-choice targets (and the token table of the compared routers)
STRATIFIED_SEEDS = (0, 1)
FASTV_KEEP = 0.11  # FastV's 84.1% point of the issue: K = 2, 11% of the tokens
LAYER_COUNTS = (1, 2, 3, 4, 5)  # of 6
VALIDATION_SEED = 31_337
MATCH = 0.03


@dataclasses.dataclass(frozen=True)
class TeacherAttention:
    """Reference: the visual tokens the unpruned model's last token attends to most in `score_layer`
    (an extra full pass, not priced), kept tile-balanced from layer `layer` on."""

    keep: float
    layer: int = 0
    score_layer: int = 1

    def decide(self, pm, prep):
        scores = teacher_pass(pm, prep, self.score_layer).token_scores
        k = torch.tensor([keep_count(self.keep, n) for n in prep.n_visual])
        ranked = balanced_scores(scores, prep.n_visual, prep.visual_grids, k)
        return Plan(keep={self.layer: [ranked[b, :n].topk(int(k[b])).indices for b, n in enumerate(prep.n_visual)]}), []


def router_digest(path) -> str:
    return hashlib.sha256((Path(path) / "router.safetensors").read_bytes()).hexdigest()[:12]


def baseline(pm, name: str, calib):
    method = vlmprune.build_method(name, **({"keep_layers": 1} if name in ("shortgpt", "random-layers") else {}))
    return method.calibrate(pm, calib) if hasattr(method, "calibrate") else method


def bits(correct) -> str:
    return "".join("1" if c else "0" for c in correct)


def unbits(text: str) -> list[float]:
    return [float(c == "1") for c in text]


def mean_of(*rows: str) -> list[float]:
    """Per-question mean correctness over several runs (e.g. seeds)."""
    return [sum(col) / len(col) for col in zip(*(unbits(r) for r in rows))]


def interval(a, b) -> dict:
    """Paired bootstrap of mean(a) - mean(b): 95%, 1000 resamples, seed 0."""
    return paired_bootstrap(a, b, resamples=1000, seed=0).to_dict()


def fmt(iv: dict) -> str:
    return f"{iv['diff'] * 100:+.1f} [{iv['low'] * 100:+.1f}, {iv['high'] * 100:+.1f}]"


class Points:
    """Evaluated points cached in the JSON by tag; PAR points are keyed by their router's digest."""

    def __init__(self, pm, path: Path, key: dict):
        self.pm, self.path = pm, path
        self.result = json.loads(path.read_text()) if path.exists() else {}
        if self.result.get("key") != key:
            self.result = dict(key=key, points={})
        self.points = self.result["points"]

    def get(self, tag: str, method, samples, digest: str | None = None) -> dict:
        p = self.points.get(tag)
        if p is None or p.get("router") != digest:
            start = time.perf_counter()
            res = evaluate(self.pm, samples, prune=method, progress=False)
            p = dict(accuracy=res.accuracy, per_type=res.per_type, share=res.lm_share, layers_run=res.layers_run,
                     visual_tokens_kept=res.visual_tokens_kept, seconds=time.perf_counter() - start, correct=bits(res.correct),
                     router=digest)
            self.points[tag] = p
            self.save()
            print(f"{tag}: {p['accuracy'] * 100:.1f}% at share {p['share']:.3f} ({p['seconds']:.0f} s)", flush=True)
        return p

    def save(self) -> None:
        write_json(self.path, self.result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="testbed", help="the router to benchmark ('testbed': the shipped one)")
    parser.add_argument("--compare", default="", help="other routers (e.g. at other token layers) for the token-layer table, comma-separated")
    parser.add_argument("--shares", default="0.6,0.3")
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--layer-questions", type=int, default=1000, help="questions for the layer-count table")
    parser.add_argument("--baseline-layers", default="0,2", help="token layers K whose token-choice baselines run even without a router there")
    parser.add_argument("--baselines-only", action="store_true", help="evaluate only what does not need a router, then stop")
    parser.add_argument("--json", default="benchmarks/results/par.json")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    router = Path(PAR.load(args.router).router)
    compare = [Path(p) for p in args.compare.split(",") if p]
    routers = [router, *compare]
    layer_of = {r: load_router(r).config.token_layer for r in routers}

    pm = vlmprune.load("testbed")
    samples = eval_set(args.limit)
    calib = scene_batches(pm.processor.tokenizer, 64, seed=CALIBRATION_SEED)
    pts = Points(pm, Path(args.json), dict(limit=args.limit))
    result = pts.result
    result["n_layers"] = pm.n_layers
    result["routers"] = {str(r): dict(token_layer=layer_of[r], digest=router_digest(r)) for r in routers}
    result["main_router"] = str(router)
    full = pts.get("full", None, samples)

    # what needs no router: the training-free methods at every share, and the token-choice baselines
    for share in shares:
        for name in BASELINES:
            pts.get(f"{name} @ {share:g}", vlmprune.AtFlops(baseline(pm, name, calib), share), samples)
    main_k = layer_of[router]
    for k in sorted({main_k, *layer_of.values(), *(int(x) for x in args.baseline_layers.split(",") if x)}):
        for keep in TOKEN_SHARES if k == main_k else TARGET_SHARES:
            for seed in STRATIFIED_SEEDS:
                pts.get(f"stratified-random K{k} keep {keep:g} seed {seed}", vlmprune.build_method("stratified-random", keep=keep, layer=k, seed=seed), samples)
        for keep in TARGET_SHARES if k == main_k else ():  # the references, at the main router's K
            pts.get(f"random K{k} keep {keep:g}", vlmprune.build_method("random", keep=keep, layer=k), samples)
            pts.get(f"teacher-attention K{k} keep {keep:g}", TeacherAttention(keep, layer=k), samples)
    fastv = pts.get(f"fastv keep {FASTV_KEEP:g}", vlmprune.FastV(layer=2, keep=FASTV_KEEP), samples)
    shortgpt = baseline(pm, "shortgpt", calib)
    subset = samples[: args.layer_questions]
    for n in LAYER_COUNTS:
        pts.get(f"shortgpt {n} layers", dataclasses.replace(shortgpt, keep_layers=n), subset)
    if args.baselines_only:
        return

    # PAR: the main table, the token table, FastV's point, the layer table
    digest = {r: router_digest(r) for r in routers}
    validation = data.generate(500, "train", seed=VALIDATION_SEED)
    main_digest = digest[router]
    for share in shares:
        chosen = result.setdefault("hybrid_layers", {}).get(f"{share:g}")
        if chosen is None or chosen.get("router") != main_digest:
            score = {l: evaluate(pm, validation, prune=vlmprune.AtFlops(PAR.load(router, layers=l), share), progress=False).accuracy
                     for l in HYBRID_LAYERS}
            chosen = dict(layers=max(score, key=score.get), validation=score, router=main_digest)
            result["hybrid_layers"][f"{share:g}"] = chosen
        pts.get(f"par @ {share:g}", vlmprune.AtFlops(PAR.load(router, layers=chosen["layers"]), share), samples, main_digest)
        pts.get(f"par-tokens @ {share:g}", vlmprune.AtFlops(PARTokens(router=str(router)), share), samples, main_digest)
        pts.get(f"par-layers @ {share:g}", vlmprune.AtFlops(PARLayers(router=str(router), keep_layers=6), share), samples, main_digest)
    for r in routers:
        k = layer_of[r]
        for keep in TOKEN_SHARES if k == layer_of[router] else TARGET_SHARES:
            pts.get(f"par-tokens {r} keep {keep:g}", PARTokens(router=str(r), keep=keep), samples, digest[r])
        pts.get(f"par-tokens {r} @ fastv", vlmprune.AtFlops(PARTokens(router=str(r)), fastv["share"]), samples, digest[r])
        if r != router:
            for share in shares:
                if share >= 0.05 + k / pm.n_layers:  # below that a router at K cannot go
                    pts.get(f"par {r} @ {share:g}", vlmprune.AtFlops(PAR.load(r, layers=4 / 6), share), samples, digest[r])
    for n in LAYER_COUNTS:
        if n >= max(1, layer_of[router]):
            pts.get(f"par-layers {n} layers", PARLayers(router=str(router), keep_layers=n), subset, main_digest)

    # measured prefill speed-up of PAR hybrid plans next to their FLOPs share (batch 32, sdpa)
    inputs = encode(samples[:32], pm.processor.tokenizer)
    full_ms = measure_latency(pm, inputs, decode_tokens=1, repeats=7).prefill_ms
    speed = {}
    for share in shares:
        method = vlmprune.AtFlops(PAR.load(router, layers=result["hybrid_layers"][f"{share:g}"]["layers"]), share)
        lat = measure_latency(pm, inputs, prune=method, decode_tokens=1, repeats=7)
        speed[f"{share:g}"] = dict(prefill_ms=lat.prefill_ms, full_ms=full_ms, speedup=full_ms / lat.prefill_ms,
                                   flops_share=pts.points[f"par @ {share:g}"]["share"])
    result["latency"] = speed
    result["claims"] = claims(result, shares, routers, layer_of, router)
    pts.save()
    print(report(result, shares, routers, layer_of, router))


def claims(result: dict, shares, routers, layer_of, router) -> dict:
    """Every comparison the README makes, with its paired bootstrap interval."""
    p = result["points"]
    out = {}
    for s in shares:
        par = p[f"par @ {s:g}"]
        matched = [(p[f"{n} @ {s:g}"]["accuracy"], n) for n in BASELINES if abs(p[f"{n} @ {s:g}"]["share"] - s) <= MATCH]
        if matched:
            best = max(matched)[1]
            out[f"par - {best} @ {s:g}"] = interval(unbits(par["correct"]), unbits(p[f"{best} @ {s:g}"]["correct"]))
        out[f"par - par-tokens @ {s:g}"] = interval(unbits(par["correct"]), unbits(p[f"par-tokens @ {s:g}"]["correct"]))
    for r in routers:
        k = layer_of[r]
        for keep in TOKEN_SHARES if r == router else TARGET_SHARES:
            mine = unbits(p[f"par-tokens {r} keep {keep:g}"]["correct"])
            strat = mean_of(*(p[f"stratified-random K{k} keep {keep:g} seed {sd}"]["correct"] for sd in STRATIFIED_SEEDS))
            out[f"par-tokens {r} - stratified-random K{k} @ keep {keep:g}"] = interval(mine, strat)
        out[f"par-tokens {r} - fastv {FASTV_KEEP:g}"] = interval(unbits(p[f"par-tokens {r} @ fastv"]["correct"]), unbits(p[f"fastv keep {FASTV_KEEP:g}"]["correct"]))
    return out


def report(result: dict, shares, routers, layer_of, router) -> str:
    p, c = result["points"], result["claims"]
    acc = lambda tag: f"{p[tag]['accuracy'] * 100:.1f}" if tag in p else ""
    lines = [f"full model: {acc('full')}%  (main router {router}, token layer K={layer_of[router]})", "",
             "| method | " + " | ".join(f"{s:g} FLOPs" for s in shares) + " |", "|---|" + "---:|" * len(shares)]
    for name in ("par", "par-tokens", "par-layers", *BASELINES):
        cells = [f"{acc(t)} ({p[t]['share']:.3f})" if (t := f"{name} @ {s:g}") in p else "" for s in shares]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for s in shares:
        hy = result["hybrid_layers"][f"{s:g}"]["layers"] * result["n_layers"]
        lat = result.get("latency", {}).get(f"{s:g}", {})
        claims_here = "; ".join(f"{k.split(' @')[0]} {fmt(v)}" for k, v in c.items() if k.endswith(f"@ {s:g}") and k.startswith("par -"))
        lines.append(f"share {s:g}: PAR hybrid {hy:.0f} layers; {claims_here}"
                     + (f"; prefill {lat['prefill_ms']:.1f} vs {lat['full_ms']:.1f} ms = {lat['speedup']:.2f}x" if lat else ""))
    for r in routers:
        k = layer_of[r]
        keeps = TOKEN_SHARES if r == router else TARGET_SHARES
        lines += ["", f"token choice at K={k} ({r}): accuracy by share of visual tokens kept",
                  "| | " + " | ".join(f"{x:g}" for x in keeps) + " |", "|---|" + "---:|" * len(keeps)]
        lines.append("| par-tokens | " + " | ".join(acc(f"par-tokens {r} keep {x:g}") for x in keeps) + " |")
        strat = [sum(p[f"stratified-random K{k} keep {x:g} seed {sd}"]["accuracy"] for sd in STRATIFIED_SEEDS) / len(STRATIFIED_SEEDS) for x in keeps]
        lines.append("| stratified-random (2 seeds) | " + " | ".join(f"{v * 100:.1f}" for v in strat) + " |")
        for name in ("random", "teacher-attention") if r == router else ():
            lines.append(f"| {name} | " + " | ".join(acc(f"{name} K{k} keep {x:g}") for x in keeps) + " |")
        lines.append("| par-tokens - stratified | " + " | ".join(fmt(c[f"par-tokens {r} - stratified-random K{k} @ keep {x:g}"]) for x in keeps) + " |")
        f = p[f"par-tokens {r} @ fastv"]
        lines.append(f"at FastV's FLOPs (K=2, {FASTV_KEEP:g} of the tokens: {acc(f'fastv keep {FASTV_KEEP:g}')}% at share "
                     f"{p[f'fastv keep {FASTV_KEEP:g}']['share']:.3f}): par-tokens {f['accuracy'] * 100:.1f}% at {f['share']:.3f}, "
                     f"{fmt(c[f'par-tokens {r} - fastv {FASTV_KEEP:g}'])}")
    lines += ["", "| layers kept | par-layers | shortgpt |", "|---:|---:|---:|"]
    for n in LAYER_COUNTS:
        lines.append(f"| {n} | {acc(f'par-layers {n} layers')} | {acc(f'shortgpt {n} layers')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
