"""The 2025 token methods on the testbed: accuracy at 50%, 25% and 11% of the visual tokens and at the
`AtFlops` shares of `benchmarks/par.py` (0.6 and 0.3 of the full LM prefill), each against `random`
and `stratified-random` (mean of seeds 0 and 1) with paired bootstrap 95% intervals (same questions,
1000 resamples, seed 0). Points are cached in the JSON; a re-run resumes.

    python benchmarks/token_methods_2025.py [--limit N] [--methods dart,divprune] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vlmprune
from vlmprune.eval.bootstrap import paired_bootstrap
from vlmprune.eval.vqa import evaluate
from vlmprune.files import write_json
from vlmprune.testbed import eval_set

METHODS = ("dart", "divprune", "cdpruner", "vispruner", "holov", "fastv", "visionzip", "pool")
REFERENCES = ("random", "stratified-random")
KEEPS = (0.5, 0.25, 0.11)
SHARES = (0.6, 0.3)
SEEDS = (0, 1)


def points(name: str) -> list[tuple[str, object]]:
    """(tag, decision) for every budget of `name` (the reference methods once per seed)."""
    seeds = SEEDS if name in REFERENCES else (None,)
    out = []
    for seed in seeds:
        extra = {} if seed is None else {"seed": seed}
        suffix = "" if seed is None else f" seed {seed}"
        for keep in KEEPS:
            out.append((f"{name} keep {keep:g}{suffix}", vlmprune.build_method(name, keep=keep, **extra)))
        for share in SHARES:
            out.append((f"{name} @ {share:g}{suffix}", vlmprune.AtFlops(vlmprune.build_method(name, **extra), share)))
    return out


def correct_of(result: dict, tag: str) -> list[float]:
    return [float(c == "1") for c in result["points"][tag]["correct"]]


def reference(result: dict, name: str, budget: str) -> list[float]:
    rows = [correct_of(result, f"{name} {budget} seed {s}") for s in SEEDS]
    return [sum(col) / len(col) for col in zip(*rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, compared with random and stratified-random")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default="benchmarks/results/token_methods_2025.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("limit") != args.limit:
        result = dict(limit=args.limit, points={})
    methods = [m for m in args.methods.split(",") if m]
    pm = vlmprune.load("testbed")
    samples = eval_set(args.limit)
    for name in (*REFERENCES, *methods):
        for tag, decision in points(name):
            if tag in result["points"]:
                continue
            start = time.perf_counter()
            res = evaluate(pm, samples, prune=decision, progress=False)
            result["points"][tag] = dict(accuracy=res.accuracy, share=res.lm_share, tokens=res.visual_tokens_kept,
                                         seconds=time.perf_counter() - start,
                                         correct="".join("1" if c else "0" for c in res.correct))
            write_json(path, result)
            print(f"{tag}: {res.accuracy * 100:.1f}% at share {res.lm_share:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    budgets = [f"keep {k:g}" for k in KEEPS] + [f"@ {s:g}" for s in SHARES]
    head = "| method | " + " | ".join(budgets) + " |"
    lines = [head, "|---|" + "---:|" * len(budgets)]
    claims = {}
    for name in (*methods, *REFERENCES):
        cells = []
        for b in budgets:
            if name in REFERENCES:
                accs = [result["points"][f"{name} {b} seed {s}"] for s in SEEDS]
                acc, share = sum(p["accuracy"] for p in accs) / len(accs), accs[0]["share"]
            else:
                p = result["points"][f"{name} {b}"]
                acc, share = p["accuracy"], p["share"]
            cells.append(f"{acc * 100:.1f} ({share:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "difference against random / stratified-random (points, paired bootstrap 95%)", head,
              "|---|" + "---:|" * len(budgets)]
    for name in methods:
        cells = []
        for b in budgets:
            mine = correct_of(result, f"{name} {b}")
            ivs = {ref: paired_bootstrap(mine, reference(result, ref, b), resamples=1000, seed=0).to_dict()
                   for ref in REFERENCES}
            claims[f"{name} {b}"] = ivs
            cells.append(" / ".join(f"{iv['diff'] * 100:+.1f} [{iv['low'] * 100:+.1f}, {iv['high'] * 100:+.1f}]"
                                    for iv in ivs.values()))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    result["claims"] = claims
    write_json(path, result)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
