"""Conformance: every registered method (a new one joins by registering; none is skipped unless
EXEMPT says why) keeps its promises on tiny random-weight models of two families:

* at the keep-everything budget its logits are the unpruned model's;
* the plan it records round-trips through JSON and, replayed as a plain Plan, gives its logits again;
* a sample's logits in a padded batch equal the sample's alone;
* its priced counts (schedule, self-pricing or its plan) equal what its run records;
* it is of the kind it registered: ``before`` decides with no policies inside the LLM, ``layers``
  only skips layers, ``inside`` runs policies;
* bad budgets (0, negative, above 1, a bool, text) are refused at construction.
"""

import dataclasses
import json

import pytest
import torch

import vlmprune
from conftest import make_batch, sample_inputs
from vlmprune.engine.plan import Plan
from vlmprune.errors import VlmpruneError
from vlmprune.eval.flops import LMCounts
from vlmprune.methods.budget import method_counts
from vlmprune.counts import lm_share
from vlmprune.methods.protocols import Calibrates, PricesItself
from vlmprune.methods.registry import METHODS

FAMILIES = ("llava", "qwen2_vl")
FAMILY_OF = {"downsample": "qwen2_vl"}  # LLaVA-1.5's fixed resolution refuses re-encoding (it names pool)
OPTIONS = {"fastv": dict(layer=2), "dart": dict(layer=2)}  # layers the 6-layer tiny models have
KEEP_ALL = {"par": dict(layers=1.0)}  # besides its budget field at 1.0: a hybrid's other budget
EXEMPT = {  # (method, check) -> why that check cannot hold for that method
    ("downsample", "replay"): "the image is re-encoded at a lower resolution before the vision tower; a Plan cannot say that",
    ("downsample", "kind"): "it re-encodes the inputs, so decide on prepared inputs is refused (pm(...) runs reencode first)",
}


def _exempt(name, check):
    reason = EXEMPT.get((name, check))
    if reason:
        pytest.skip(reason)


def _router(tmp_path_factory, pm) -> str:
    from vlmprune.methods.par import Router, RouterConfig, save_router

    torch.manual_seed(0)
    router = Router(RouterConfig.for_model(pm))
    with torch.no_grad():  # spread the scores so the top-k is well defined
        router.token_head.weight.normal_(0, 1.0)
        router.layer_head.weight.normal_(0, 1.0)
    return str(save_router(router, tmp_path_factory.mktemp("router") / "router"))


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_models(family)
            pm = vlmprune.wrap(model)
            batch = make_batch(family, model, [3, 6], [4, 2], "left")
            cache[family] = (pm, batch, _router(tmp_path_factory, pm))
        return cache[family]

    return get


def _method(setup, name, family, budget=None):
    pm, batch, router = setup(family)
    cls = METHODS[name]
    options = dict(OPTIONS.get(name, {}))
    if "router" in {f.name for f in dataclasses.fields(cls)}:
        options["router"] = router
    method = cls(**options)
    if budget is not None:
        method = dataclasses.replace(method, **{cls.budget: budget})
    if isinstance(method, Calibrates):
        method = method.calibrate(pm, [batch.kwargs()])
    return pm, batch, method


def _cases():
    for name in METHODS:
        family = FAMILY_OF.get(name)
        for f in [family] if family else FAMILIES:
            yield pytest.param(name, f, id=f"{name}-{f}")


CASES = list(_cases())


def test_every_registered_method_has_a_budget_and_a_kind():
    assert len(CASES) >= 2 * len(METHODS) - len(FAMILY_OF)
    for name, cls in METHODS.items():
        assert cls.kind in ("before", "inside", "layers", "hybrid") and cls.budget in ("keep", "keep_layers"), name


@pytest.mark.parametrize("name, family", CASES)
def test_keep_everything_is_the_unpruned_model(setup, name, family):
    _exempt(name, "keep_all")
    pm, batch, method = _method(setup, name, family, budget=1.0)
    method = dataclasses.replace(method, **KEEP_ALL.get(name, {}))
    full = pm(**batch.kwargs()).logits
    got = pm(**batch.kwargs(), prune=method).logits
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, family", CASES)
def test_the_recorded_plan_round_trips_and_replays(setup, name, family):
    _exempt(name, "replay")
    pm, batch, method = _method(setup, name, family, budget=0.5)
    out = pm(**batch.kwargs(), prune=method)
    plan = out.stats.plan
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert plan.keep or plan.skip.layers, "the budget pruned nothing"
    replay = pm(**batch.kwargs(), prune=again)
    torch.testing.assert_close(replay.logits, out.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, family", CASES)
def test_a_sample_in_a_padded_batch_gets_what_it_gets_alone(setup, name, family):
    pm, batch, method = _method(setup, name, family, budget=0.5)
    together = pm(**batch.kwargs(), prune=method, logits_to_keep=1).logits
    for b in range(batch.input_ids.shape[0]):
        alone = pm(**sample_inputs(family, batch, b).kwargs(), prune=method, logits_to_keep=1).logits
        torch.testing.assert_close(together[b], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, family", CASES)
def test_priced_counts_are_what_the_run_records(setup, name, family):
    pm, batch, method = _method(setup, name, family, budget=0.5)
    counts = method_counts(method, pm, pm.prepare(**batch.kwargs()))
    ran = LMCounts.from_stats(pm(**batch.kwargs(), prune=method).stats)
    config = pm.adapter.text_config
    assert lm_share(config, counts) == pytest.approx(lm_share(config, ran), rel=1e-12)
    # a method that prices itself may stand in a cost-equal set of layers for the ones its router picks (PAR)
    exact = () if isinstance(method, PricesItself) else ("tokens", "layers_run")
    for field in exact + ("score_rows", "input_text", "input_visual"):
        assert torch.equal(getattr(counts, field), getattr(ran, field)), field
    assert torch.equal(counts.layers_run.sum(-1), ran.layers_run.sum(-1))


@pytest.mark.parametrize("name, family", CASES)
def test_a_method_is_of_the_kind_it_registered(setup, name, family):
    _exempt(name, "kind")
    pm, batch, method = _method(setup, name, family, budget=0.5)
    plan, policies = method.decide(pm, pm.prepare(**batch.kwargs()))
    kind = type(method).kind
    if kind == "before":
        assert not policies and not plan.skip.layers
    elif kind == "layers":
        assert not plan.keep and plan.skip.layers
    elif kind == "inside":  # policies inside the LLM (PAR-tokens: or a plan, when its router reads layer 0)
        assert (policies or plan.keep) and not plan.skip.layers


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, True, "half"])
def test_bad_budgets_are_refused_at_construction(setup, name, bad):
    cls = METHODS[name]
    with pytest.raises(VlmpruneError, match=cls.budget):
        cls(**{cls.budget: bad})
