"""`vlmprune demo`: the main job on the embedded default (the shipped FashionScenes LLaVA), as a table.

Accuracy on the first questions of the shipped evaluation set, with the tokens, layers, FLOPs and
prefill time each setting actually ran, and one worked example.
"""

from __future__ import annotations

from .engine.plan import Plan


def run_demo(limit: int = 300, seed: int = 0) -> list[dict]:
    from . import load
    from .eval.vqa import evaluate
    from .prompting import generate_answer
    from .testbed import data, eval_set
    from .testbed.decisions import nonempty_cells, random_keep

    pm = load("testbed")
    samples = eval_set(limit)
    n_layers = pm.n_layers
    settings = {
        "full model": None,
        "random 50% visual tokens": random_keep(0.5, seed),
        "random 25% visual tokens": random_keep(0.25, seed),
        "oracle: non-empty cells only": nonempty_cells,
        f"skip layers {n_layers - 2},{n_layers - 1}": Plan(skip=[n_layers - 2, n_layers - 1]),
    }
    example = samples[0]
    from PIL import Image

    answer, _ = generate_answer(pm, data.prompt(example.question), Image.fromarray(example.image), max_new_tokens=3)
    print(f"example: '{example.question}' -> model: '{answer}' (truth: '{example.answer}')")
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
