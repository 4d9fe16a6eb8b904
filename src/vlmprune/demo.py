"""`vlmprune demo`: the main job on the embedded default, as a small table.

Until the trained testbed ships (issue 3) the demo uses the testbed *recipe* with random weights:
the pruning mechanics, accounting and timings are real, the answers are not meaningful.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from .engine.plan import Plan


def _synthetic_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((84, 84)) * 255).astype("uint8"))


def _median_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def run_demo(seed: int = 0) -> list[dict]:
    from . import load
    from .prompting import build_inputs
    from .testbed.recipe import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        pm = load(random_checkpoint(tmp, seed))
    inputs = build_inputs(pm, "user : <image> what is in the image ? assistant :", _synthetic_image(seed))
    n_visual = int((inputs["input_ids"] == pm.adapter.image_token_id).sum())
    n_layers = pm.n_layers
    spread = lambda k: torch.linspace(0, n_visual - 1, k).round().long()[None]
    settings = {
        "full model": None,
        "keep 25% visual from layer 2": Plan(keep={2: spread(n_visual // 4)}),
        "keep 11% visual from layer 0": Plan(keep={0: spread(n_visual // 9)}),
        "skip 25% of layers": Plan(skip=list(range(n_layers - n_layers // 4, n_layers))),
    }
    rows = []
    print("vlmprune demo: testbed recipe with RANDOM weights (the trained testbed arrives with issue 3)")
    print(f"{'setting':<32} {'visual@last':>11} {'layers':>7} {'KV MiB':>7} {'prefill ms':>10}")
    for name, plan in settings.items():
        out = pm(**inputs, prune=plan, logits_to_keep=1)
        ms = _median_ms(lambda: pm(**inputs, prune=plan, logits_to_keep=1))
        st = out.stats
        row = dict(setting=name, visual_last=int(st.visual_tokens[0, -1]), layers=int(st.layers_run[0].sum()),
                   kv_mib=st.kv_bytes / 2**20, prefill_ms=ms)
        rows.append(row)
        print(f"{name:<32} {row['visual_last']:>11} {row['layers']:>4}/{n_layers:<2} {row['kv_mib']:>7.3f} {ms:>10.2f}")
    return rows
