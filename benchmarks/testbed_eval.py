"""The testbed's quality record: accuracy of the shipped model on the shipped evaluation set.

Reports the full model (overall, per question type, chance), the random visual-token curve at
100/50/25/10% kept (dropped before the first layer), the non-empty-cells oracle, and for cell
questions the asked-cell oracle. Writes benchmarks/results/testbed_eval.json and, with --record,
the package's src/vlmprune/testbed/assets/metrics.json that the tests check against.

    python benchmarks/testbed_eval.py [--limit N] [--record]
"""

from __future__ import annotations

import argparse

import vlmprune
from vlmprune.eval.vqa import evaluate
from vlmprune.files import write_json
from vlmprune.testbed import ASSETS, eval_set
from vlmprune.testbed.decisions import asked_cell, nonempty_cells, random_keep

SUBSET = 200  # the fixed subset the default test suite re-checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--record", action="store_true", help="write the package's metrics.json")
    parser.add_argument("--json", default="benchmarks/results/testbed_eval.json")
    args = parser.parse_args()
    pm = vlmprune.load("testbed")
    samples = eval_set(args.limit)
    cells = [s for s in samples if s.qtype == "cell"]
    rows = {}
    full = evaluate(pm, samples)
    rows["full model"] = full
    for ratio in (0.5, 0.25, 0.1):
        rows[f"random {ratio:.0%} kept"] = evaluate(pm, samples, prune=random_keep(ratio, seed=0))
    rows["oracle: non-empty cells"] = evaluate(pm, samples, prune=nonempty_cells)
    rows["cell questions, full"] = evaluate(pm, cells)
    rows["cell questions, oracle: asked cell"] = evaluate(pm, cells, prune=asked_cell)

    print(f"FashionScenes evaluation set: {len(samples)} questions; chance {full.chance}")
    print("| setting | n | accuracy | cell | count | exists | where | visual tokens kept |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        per = " | ".join(f"{r.per_type.get(q, float('nan')) * 100:.1f}" for q in ("cell", "count", "exists", "where"))
        print(f"| {name} | {r.n} | {r.accuracy * 100:.1f} | {per} | {r.visual_tokens_kept:.1f} |")
    result = {name: r.to_dict() for name, r in rows.items()}
    subset = evaluate(pm, samples[:SUBSET], progress=False)
    result["subset"] = dict(n=SUBSET, accuracy=subset.accuracy, predictions=subset.predictions)
    write_json(args.json, result)
    if args.record:
        if args.limit:
            raise SystemExit("--record needs the whole evaluation set (no --limit)")
        print(f"recorded -> {write_json(ASSETS / 'metrics.json', result)}")


if __name__ == "__main__":
    main()
