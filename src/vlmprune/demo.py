"""`vlmprune demo`: the main job on the embedded default (the shipped FashionScenes LLaVA), as a table.

Accuracy on the first questions of the shipped evaluation set, with the tokens, layers, FLOPs and
prefill time each setting actually ran, and one worked example. While no trained testbed checkpoint
is bundled, it runs the testbed recipe with random weights instead and says so: the pruning
mechanics, accounting and timings are real, the answers are not.
"""

from __future__ import annotations

import tempfile

from .engine.plan import Plan


def run_demo(limit: int = 300, seed: int = 0) -> list[dict]:
    from .testbed import ASSETS

    if not (ASSETS / "model" / "config.json").is_file():
        return run_recipe_demo(limit, seed)
    return run_testbed_demo(limit, seed)


def run_recipe_demo(limit: int = 300, seed: int = 0) -> list[dict]:
    """The demo on a random-weight model of the testbed recipe (no trained checkpoint bundled)."""
    from . import load
    from .testbed import data, eval_set
    from .testbed.recipe import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        pm = load(random_checkpoint(tmp, seed, words=data.vocabulary()))
    print("vlmprune demo: no trained testbed is bundled yet, so this runs the testbed recipe with RANDOM weights;")
    print("pruning mechanics, accounting and timings are real, accuracies are chance level.")
    return _table(pm, eval_set(min(limit, 64)), seed)


def run_testbed_demo(limit: int = 300, seed: int = 0) -> list[dict]:
    from . import load
    from .prompting import generate_answer
    from .testbed import data, eval_set

    pm = load("testbed")
    samples = eval_set(limit)
    example = samples[0]
    from PIL import Image

    # answers are one word; the model was trained on multi-turn conversations, so it does not stop by itself
    answer, _ = generate_answer(pm, data.prompt(example.question), Image.fromarray(example.image), max_new_tokens=1)
    print(f"example: '{example.question}' -> model: '{answer}' (truth: '{example.answer}')")
    return _table(pm, samples, seed)


def _table(pm, samples, seed: int) -> list[dict]:
    from .eval.vqa import evaluate
    from .methods import FastV, Pool, VisionZip
    from .testbed.decisions import nonempty_cells, random_keep

    n_layers = pm.n_layers
    settings = {
        "full model": None,
        "FastV 25% visual tokens": FastV(layer=2, keep=0.25),
        "VisionZip 25% visual tokens": VisionZip(keep=0.25),
        "pool 25% visual tokens": Pool(keep=0.25),
        "random 25% visual tokens": random_keep(0.25, seed),
        "oracle: non-empty cells only": nonempty_cells,
        f"skip layers {n_layers - 2},{n_layers - 1}": Plan(skip=[n_layers - 2, n_layers - 1]),
    }
    print(f"FashionScenes, first {len(samples)} evaluation questions, testbed LLaVA ({n_layers} decoder layers)")
    print(f"| {'setting':<30} | accuracy | visual tokens | layers | LM GFLOPs | prefill ms/sample |")
    print(f"|{'-' * 32}|---------:|--------------:|-------:|----------:|------------------:|")
    rows = []
    for name, prune in settings.items():
        r = evaluate(pm, samples, prune=prune, progress=False)
        rows.append(dict(setting=name, **r.to_dict()))
        print(f"| {name:<30} | {r.accuracy * 100:7.1f}% | {r.visual_tokens_kept:13.1f} | {r.layers_run:6.2f} | "
              f"{r.lm_tflops * 1e3:9.3f} | {r.prefill_ms_per_sample:17.2f} |")
    return rows
