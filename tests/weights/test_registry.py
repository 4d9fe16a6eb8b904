"""The weight-pruning registries from outside the package: a local pruner and an allocation defined and
registered here run by name through `prune_weights` and equal a brute-force expectation; a pruner gets
exactly the statistics it declares; duplicates and unknown names fail loudly; the config is one object
(keywords build the same one, by name) and every field is one CLI flag of the same name, round-trip."""

import dataclasses

import pytest
import torch
import transformers

from conftest import TEXT
from vlmprune.cli import build_parser
from vlmprune.errors import VlmpruneError
from vlmprune.weights import (
    ALLOCATIONS,
    PRUNERS,
    AllocationInputs,
    Pruned,
    WeightPruneConfig,
    config_from,
    prune_weights,
    register_allocation,
    register_pruner,
    unit_sparsities,
)

SEEN_STATS = []  # (stat names, shapes) each call of the test pruner received
SEEN_INPUTS = []  # the AllocationInputs the test allocation's score step received


@register_pruner("test-largest-first", needs=("norm",))
def largest_first(weight, stats, pattern, cfg):
    """Zero the largest |w| of the matrix (the opposite of magnitude pruning), reading no statistic."""
    SEEN_STATS.append({name: tuple(t.shape) for name, t in stats.items()})
    k = int(pattern.sparsity * weight.numel())
    flat = weight.detach().abs().reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.topk(k).indices] = False
    keep = keep.reshape(weight.shape)
    return Pruned(weight.detach().masked_fill(~keep, 0), keep)


def unit_abs_sums(inputs: AllocationInputs, cfg):
    SEEN_INPUTS.append(inputs)
    return {unit.name: float(sum(m.weight.detach().abs().sum() for m in unit.linears.values())) for unit in inputs.units}


@register_allocation("test-halves", scores=unit_abs_sums)
def halves(params, scores, cfg):
    """The half of the units with the larger scores at target - 1/8, the other half at target + 1/8."""
    ranked = sorted(params, key=lambda u: -scores[u])
    top = set(ranked[: len(ranked) // 2])
    return {u: cfg.target - 0.125 if u in top else cfg.target + 0.125 for u in params}


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()


def _batches():
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    return [dict(input_ids=ids, attention_mask=torch.ones_like(ids))]


def _linears(layer):
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def test_a_registered_pruner_and_allocation_run_by_name_as_brute_force():
    SEEN_STATS.clear()
    SEEN_INPUTS.clear()
    model = _llama()
    report = prune_weights(model, _batches(), WeightPruneConfig(method="test-halves", local="test-largest-first", sparsity=0.5))

    dense = _llama()  # brute force on the same dense weights, in plain Python
    layers = dense.model.layers
    sums = [sum(abs(x) for m in _linears(layer).values() for x in m.weight.reshape(-1).tolist()) for layer in layers]
    order = sorted(range(len(layers)), key=lambda i: -sums[i])
    sparsity = {i: 0.375 if i in order[: len(layers) // 2] else 0.625 for i in range(len(layers))}
    for i, layer in enumerate(layers):
        for sub, linear in _linears(layer).items():
            values = linear.weight.reshape(-1).tolist()
            k = int(sparsity[i] * len(values))
            largest = set(sorted(range(len(values)), key=lambda j: -abs(values[j]))[:k])
            expected = torch.tensor([0.0 if j in largest else v for j, v in enumerate(values)]).reshape(linear.weight.shape)
            name = f"model.layers.{i}.{sub}"
            assert torch.equal(model.get_submodule(name).weight, expected), name
            assert report.allocated[name] == sparsity[i]
    assert [u["name"] for u in report.units] == [f"model.layers.{i}" for i in range(len(layers))]
    assert [u["score"] for u in report.units] == pytest.approx(sums, rel=1e-6)
    assert (report.method, report.local, report.order, report.score_samples, report.owl_lambda) == ("test-halves", "test-largest-first", None, None, None)
    assert len(SEEN_STATS) == len(report.achieved) and all(s == {"norm": (s_shape,)} for s, s_shape in
                                                          zip(SEEN_STATS, [m.in_features for m in _in_model_order(model)]))
    (inputs,) = SEEN_INPUTS
    assert [s.name for s in inputs.stacks] == ["language"] and len(inputs.batches) == 1


def _in_model_order(model):
    return [m for layer in model.model.layers for m in _linears(layer).values()]


def test_a_pruner_gets_exactly_the_statistics_it_declares():
    got = []

    @register_pruner("test-spy-hessian", needs=("hessian",))
    def spy(weight, stats, pattern, cfg):
        got.append({k: tuple(v.shape) for k, v in stats.items()})
        keep = torch.ones_like(weight, dtype=torch.bool)
        return Pruned(weight.detach().clone(), keep)

    @register_pruner("test-spy-none")
    def blind(weight, stats, pattern, cfg):
        got.append(dict(stats))
        return Pruned(weight.detach().clone(), torch.ones_like(weight, dtype=torch.bool))

    try:
        prune_weights(_llama(), _batches(), local="test-spy-hessian", sparsity=0.5, progress=False)
        assert got and all(g == {"hessian": (s, s)} for g, s in zip(got, [m.in_features for m in _in_model_order(_llama())]))
        got.clear()
        prune_weights(_llama(), [], local="test-spy-none", method="uniform", sparsity=0.5, progress=False)  # no calibration needed
        assert got and all(g == {} for g in got)
    finally:
        PRUNERS.remove("test-spy-hessian")
        PRUNERS.remove("test-spy-none")


def test_duplicates_and_unknown_names_fail_loudly():
    with pytest.raises(VlmpruneError, match="'wanda' is already registered"):
        register_pruner("wanda")(largest_first)
    with pytest.raises(VlmpruneError, match="'owl' is already registered"):
        register_allocation("owl")(halves)
    with pytest.raises(VlmpruneError, match="needs \\['gradient'\\].*norm, hessian"):
        register_pruner("test-needs-gradient", needs=("gradient",))
    with pytest.raises(VlmpruneError, match="local='obs' is not one of wanda, sparsegpt, magnitude, .*test-largest-first"):
        WeightPruneConfig(local="obs")
    with pytest.raises(VlmpruneError, match="method='sparse' is not one of uniform, owl, ecoflap, .*test-halves"):
        WeightPruneConfig(method="sparse")
    assert PRUNERS.names()[:3] == ("wanda", "sparsegpt", "magnitude") and ALLOCATIONS.names()[:3] == ("uniform", "owl", "ecoflap")


def test_an_allocation_must_give_every_unit_a_sparsity():
    @register_allocation("test-missing")
    def missing(params, scores, cfg):
        return {next(iter(params)): 0.5}

    @register_allocation("test-too-sparse")
    def too_sparse(params, scores, cfg):
        return {u: 1.0 for u in params}

    try:
        with pytest.raises(VlmpruneError, match="'test-missing' must return .* for exactly the units"):
            prune_weights(_llama(), [], method="test-missing", local="magnitude", progress=False)
        with pytest.raises(VlmpruneError, match="sparsity 1.0; a sparsity is a number in \\[0, 1\\)"):
            unit_sparsities(WeightPruneConfig(method="test-too-sparse"), {"a": 4}, None)
    finally:
        ALLOCATIONS.remove("test-missing")
        ALLOCATIONS.remove("test-too-sparse")


def test_keywords_build_the_same_config_by_name():
    cfg = WeightPruneConfig(method="owl", local="magnitude", sparsity=0.25, owl_lambda=0.05, granularity="layer")
    a, b = _llama(), _llama()
    one = prune_weights(a, _batches(), cfg, progress=False)
    two = prune_weights(b, _batches(), progress=False, **{f.name: getattr(cfg, f.name) for f in reversed(dataclasses.fields(cfg))})
    assert one.units == two.units and one.allocated == two.allocated
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(VlmpruneError, match="either cfg or its fields"):
        prune_weights(_llama(), _batches(), cfg, sparsity=0.5)
    with pytest.raises(VlmpruneError, match="unknown weight-pruning option.*'sparse'.*method, local, sparsity"):
        prune_weights(_llama(), _batches(), sparse=0.5)
    with pytest.raises(VlmpruneError, match="cfg must be a WeightPruneConfig"):
        prune_weights(_llama(), _batches(), "owl")


def _flag_text(value):
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_every_config_field_is_one_cli_flag_that_round_trips():
    parser = build_parser()
    fields = dataclasses.fields(WeightPruneConfig)
    given = vars(parser.parse_args(["prune-weights", "--model", "m", "--out", "o"]))
    assert all(given[f.name] is None for f in fields)  # a flag per field, its dest the field's name; unset: the default
    # every field away from its default, each value distinct: a swapped pair would show
    cfg = WeightPruneConfig(method="ecoflap", local="sparsegpt", sparsity=0.3, nm=None, order="first", granularity="layer",
                            cap=0.05, patterns=("*mlp*", "re:q_proj"), seed=7, score_samples=3, score_tokens=9,
                            allocation="clamped", zeroth_mode="block", zeroth_batch=4, score="grad", owl_lambda=0.02, owl_m=3.5)
    assert all(getattr(cfg, f.name) != f.default for f in fields if f.name != "nm")
    argv = ["prune-weights", "--model", "m", "--out", "o"]
    for f in fields:
        if getattr(cfg, f.name) is not None:
            argv += ["--" + f.name.replace("_", "-"), _flag_text(getattr(cfg, f.name))]
    assert config_from(vars(parser.parse_args(argv))) == cfg
    assert config_from(vars(parser.parse_args(["prune-weights", "--model", "m", "--out", "o"]))) == WeightPruneConfig()
    nm = config_from(vars(parser.parse_args(["prune-weights", "--model", "m", "--out", "o", "--nm", "2:4"])))
    assert nm == WeightPruneConfig(nm="2:4")
