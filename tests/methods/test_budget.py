"""FLOPs budgets: the chosen budget's achieved share is the closest of every budget value, found by
running the model at each one (brute force); schedules equal what the runs record; clear errors."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import vlmprune
from conftest import make_batch
from vlmprune.engine.plan import Plan
from vlmprune.eval.flops import LMCounts
from vlmprune.methods.budget import first_reaching, method_counts
from vlmprune.methods.registry import METHODS

TARGETS = (0.3, 0.55, 0.8, 1.0)
TOKEN_METHODS = {
    "fastv": dict(layer=2),
    "pdrop": dict(stages=(0.34, 0.67)),
    "sparsevlm": dict(stages=(0.34, 0.67)),
    "random": dict(),
    "stratified-random": dict(),
    "pool": dict(),
    "visionzip": dict(),
    "dart": dict(layer=2),
    "divprune": dict(),
    "cdpruner": dict(),
    "vispruner": dict(),
    "holov": dict(),
}
NOT_HERE = {  # token methods with a `keep` budget that this test cannot run as-is, and why
    "downsample": "re-encodes images: LLaVA-1.5 is refused; tested in test_vision_side_methods.py",
    "par": "needs a trained router; tested in test_par.py",
    "par-tokens": "needs a trained router; tested in test_par.py",
}


def test_every_registered_token_budget_method_is_checked():
    """A newly registered method with a `keep` budget joins this matrix, or says here why not."""
    from dataclasses import fields

    with_keep = {name for name, cls in METHODS.items() if "keep" in {f.name for f in fields(cls)}}
    assert with_keep - set(TOKEN_METHODS) - set(NOT_HERE) == set()
    assert set(TOKEN_METHODS) <= set(METHODS)


def _achieved(pm, batch, method) -> float:
    """The share a real run achieves, priced from its own stats."""
    return vlmprune.flops(pm, pm(**batch.kwargs(), prune=method, logits_to_keep=1).stats, vision=False).batch_share


def _check_closest(pm, batch, method, values, knob):
    brute = [_achieved(pm, batch, dataclasses.replace(method, **{knob: v})) for v in values]
    prep = pm.prepare(**batch.kwargs())
    for target in TARGETS:
        budget = vlmprune.AtFlops(method, share=target)
        chosen = budget.resolve(pm, prep)
        achieved = _achieved(pm, batch, budget)
        assert achieved == pytest.approx(chosen.share, abs=1e-12)  # priced without running = what ran
        best = min(abs(s - target) for s in brute)
        assert abs(achieved - target) <= best + 1e-12, (target, achieved, sorted(brute))
        # within one budget step: the achieved share is one of the two that bracket the target
        below = max((s for s in brute if s <= target), default=min(brute))
        above = min((s for s in brute if s >= target), default=max(brute))
        assert below - 1e-12 <= achieved <= above + 1e-12 and chosen.value in values


def test_the_search_finds_the_first_share_reaching_the_target_with_few_pricings():
    """`first_reaching` against a scan of every index, on non-decreasing shares with plateaus, jumps
    and curvature; and near-linear shares (what pricing gives) take a handful of pricings."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 200, (1,), generator=gen))
        steps = torch.rand(n, generator=gen) ** (1 + trial % 4) * (torch.rand(n, generator=gen) < 0.7)
        shares = (steps.cumsum(0) / max(float(steps.sum()), 1e-9)).tolist()
        for target in (0.0, 0.3, 0.5, 0.71, 1.0, 1.5, shares[n // 2]):
            calls = []
            found = first_reaching(lambda i: calls.append(i) or shares[i], n, target)
            expected = next((i for i, s in enumerate(shares) if s >= target), n - 1)
            assert found == expected, (n, target)
            assert len(set(calls)) <= 2 * max(1, n).bit_length() + 2
    linear = [(k + 1) / 144 * 0.9 + 0.1 for k in range(144)]
    for target in (0.25, 0.5, 0.6, 0.8):
        calls = set()
        first_reaching(lambda i: calls.add(i) or linear[i], 144, target)
        assert len(calls) <= 5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", pytest.param("llava_next", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(TOKEN_METHODS))
def test_token_budget_is_the_closest_of_every_count(tiny_models, family, name):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6], [4, 2], "left")  # qwen2_vl / llava_next: ragged visual counts
    pm = vlmprune.wrap(model)
    method = METHODS[name](**TOKEN_METHODS[name])
    values = sorted({k / n for n in batch.n_visual for k in range(1, n + 1)})  # every count of every sample
    _check_closest(pm, batch, method, values, "keep")


@pytest.mark.parametrize("name", ["shortgpt", "random-layers"])
def test_layer_budget_is_the_closest_of_every_layer_count(tiny_models, name):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3, 6], [4, 2], "left")
    pm = vlmprune.wrap(model)
    method = METHODS[name](keep_layers=1)
    if name == "shortgpt":
        method = method.calibrate(pm, [batch.kwargs()])
    _check_closest(pm, batch, method, list(range(1, pm.n_layers + 1)), "keep_layers")
    assert vlmprune.AtFlops(method, share=0.5).resolve(pm, pm.prepare(**batch.kwargs())).value == 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("method", [vlmprune.FastV(layer=3, keep=0.4), vlmprune.PDrop(keep=0.3, stages=(0.34, 0.67)),
                                    vlmprune.SparseVLM(keep=0.3, stages=(0.2, 0.5, 0.8))])
def test_schedules_equal_what_the_runs_record(tiny_models, family, method):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    pm = vlmprune.wrap(model)
    counts = method_counts(method, pm, pm.prepare(**batch.kwargs()))
    ran = LMCounts.from_stats(pm(**batch.kwargs(), prune=method).stats)
    for field in ("tokens", "layers_run", "score_rows", "input_text", "input_visual"):
        assert torch.equal(getattr(counts, field), getattr(ran, field)), field


@dataclass(frozen=True)
class FirstTokens:
    """A method with no schedule that decides before the LLM (how VisionZip-like methods plug in)."""

    keep: float = 1.0

    def decide(self, pm, prep):
        return Plan(keep={0: [torch.arange(max(1, round(self.keep * n))) for n in prep.n_visual]}), []


@dataclass(frozen=True)
class InModel:
    """A method that decides inside the LLM but gives no schedule."""

    keep: float = 1.0
    layers: tuple = (2,)

    def decide(self, pm, prep):
        return Plan(), [self]

    def select(self, layer, view):
        return [torch.arange(1) for _ in view.n_visual]


def test_any_plan_method_plugs_in_and_in_model_methods_need_a_schedule(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4])
    pm = vlmprune.wrap(model)
    _check_closest(pm, batch, FirstTokens(), [k / 16 for k in range(1, 17)], "keep")
    with pytest.raises(vlmprune.VlmpruneError, match="no schedule"):
        pm(**batch.kwargs(), prune=vlmprune.AtFlops(InModel(), share=0.5))


@pytest.mark.parametrize("share", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_share_outside_the_unit_interval_is_refused(share):
    with pytest.raises(vlmprune.VlmpruneError, match=r"outside \(0, 1\]"):
        vlmprune.AtFlops(vlmprune.FastV(), share=share)


def test_other_budget_errors(tiny_models):
    with pytest.raises(vlmprune.VlmpruneError, match="one pruning method"):
        vlmprune.AtFlops([vlmprune.FastV(), vlmprune.RandomLayers(keep_layers=2)], share=0.5)
    with pytest.raises(vlmprune.VlmpruneError, match="no field"):
        vlmprune.AtFlops(vlmprune.FastV(), share=0.5, knob="keep_layers")
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4])
    pm = vlmprune.wrap(model)
    fixed = vlmprune.PDrop(keep=0.5, ratio=0.5, stages=(0.5,))  # lambda given: keep changes nothing
    with pytest.raises(vlmprune.VlmpruneError, match="does not change its FLOPs"):
        pm(**batch.kwargs(), prune=vlmprune.AtFlops(fixed, share=0.5))


def test_cli_flops_option(tmp_path, capsys):
    from vlmprune.cli import _decision, build_parser, main

    base = ["generate", "--model", str(tmp_path / "absent"), "--prompt", "p"]
    args = build_parser().parse_args(base + ["--method", "random-layers", "--flops", "0.5"])
    decision = _decision(args)
    assert isinstance(decision, vlmprune.AtFlops) and decision.share == 0.5 and decision.knob == "keep_layers"
    for extra, message in [
        (["--method", "fastv", "--flops", "1.5"], "outside (0, 1]"),
        (["--method", "fastv", "--flops", "0.5", "--keep", "0.3"], "leave out --keep"),
        (["--method", "fastv,shortgpt", "--flops", "0.5"], "a single --method"),
        (["--flops", "0.5"], "name the method with --method"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_cli_generate_reports_the_achieved_share(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vlmprune.cli import main
    from vlmprune.testbed.recipe import random_checkpoint

    checkpoint = random_checkpoint(tmp_path / "model", seed=1)
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((84, 84)) * 255).astype("uint8")).save(image)
    prompt = "user : <image> what is in the image ? assistant :"
    code = main(["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", prompt,
                 "--method", "random-layers", "--flops", "0.5", "--max-new-tokens", "1"])
    assert code == 0
    assert "LM prefill FLOPs: 0.500 of the unpruned model's (target 0.5)" in capsys.readouterr().out
