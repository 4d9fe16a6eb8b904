"""DART, DivPrune, CDPruner: kept indices equal brute-force references written from each paper's
definition on the unmodified transformers model (loops over tokens, no method code); the kept tokens
leave the sequence, a padded batch gives each sample what it gets alone; the accountant prices each
method's own scoring and matches FlopCounterMode; bad configs are refused with the valid range."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmprune
from conftest import FAMILIES, IMAGE_TOKEN, make_batch, sample_inputs
from reference import _hf_inputs
from vlmprune.methods import CDPruner, DART, DivPrune
from vlmprune.methods.registry import configure

KEEP = 0.3


def _batch(tiny_models, family, padding_side="left", seed=0):
    model = tiny_models(family)
    return model, make_batch(family, model, [3, 6, 1], [4, 2, 7], padding_side, seed=seed)


def _hf_run(model, family, batch):
    """The unmodified model's hidden states (entry i = the input of layer i) and its KV cache (keys after RoPE)."""
    with torch.no_grad():
        out = model(**_hf_inputs(family, batch.input_ids, batch.attention_mask, batch.vision),
                    output_hidden_states=True, use_cache=True)
    return out.hidden_states, out.past_key_values


def _positions(batch, b):
    """Sample b's visual positions and the text positions after its first visual token (prompt order)."""
    real = batch.attention_mask[b].bool()
    visual = (batch.input_ids[b] == IMAGE_TOKEN) & real
    vis = visual.nonzero().squeeze(1).tolist()
    text = [p for p in range(batch.input_ids.shape[1]) if real[p] and not visual[p] and p > vis[0]]
    return vis, text


def _budget(keep, n):
    return max(1, min(n, round(keep * n))) if isinstance(keep, float) else keep


def _cos(a, b):
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------- references
def _dart_reference(model, hidden, cache, batch, layer, keep, pivot_image=4, pivot_text=4):
    """DART from its definition: pivots by the L1 norm of layer K-1's keys (visual: kept; text after the
    image: not kept); the k - image-pivot slots split evenly over the pivots (image pivots first, each
    group by decreasing norm, the first r % P take one more); each pivot adds the not yet kept visual
    tokens of lowest cosine to it, on layer K-1's output through the final norm."""
    norm = model.model.language_model.norm
    out = []
    for b in range(batch.input_ids.shape[0]):
        vis, text = _positions(batch, b)
        keys = cache.layers[layer - 1].keys[b]  # (Hkv, L, hd)
        l1 = {p: float(keys[:, p].abs().sum()) for p in vis + text}
        with torch.no_grad():
            h = norm(hidden[layer][b])  # output of layer K-1, final norm
        n = len(vis)
        k = _budget(keep, n)
        img = sorted(range(n), key=lambda i: (-l1[vis[i]], i))[: min(pivot_image, k)]
        txt = sorted(text, key=lambda p: (-l1[p], p))[: min(pivot_text, len(text))]
        pivots = [vis[i] for i in img] + txt
        rest = k - len(img)
        kept = set(img)
        for q, pivot in enumerate(pivots):
            quota = rest // len(pivots) + (1 if q < rest % len(pivots) else 0)
            pool = [i for i in range(n) if i not in kept]
            kept |= set(sorted(pool, key=lambda i: (_cos(h[pivot], h[vis[i]]), i))[:quota])
        out.append(sorted(kept))
    return out


def _divprune_reference(hidden, batch, keep):
    """DivPrune from its definition: max-min diversity of cosine distance on the LLM's input embeddings."""
    out = []
    for b in range(batch.input_ids.shape[0]):
        vis, _ = _positions(batch, b)
        x = hidden[0][b]
        n = len(vis)
        dist = [[1 - _cos(x[vis[i]], x[vis[j]]) for j in range(n)] for i in range(n)]
        chosen = []
        for _ in range(_budget(keep, n)):
            def score(i):
                others = [dist[i][j] for j in (chosen or range(n)) if chosen or j != i]
                return min(others) if others else math.inf
            best = max((i for i in range(n) if i not in chosen), key=lambda i: (score(i), -i))
            chosen.append(best)
        out.append(sorted(chosen))
    return out


def _cdpruner_reference(hidden, batch, keep, negate=False):
    """CDPruner from its definition: L_ij = r_i cos(x_i, x_j) r_j (r: mean cosine to the instruction's
    input embeddings, min-max normalised with +1e-6), greedy MAP: each step adds the token maximising
    log det L_Y (by determinants, not the fast update)."""
    out = []
    for b in range(batch.input_ids.shape[0]):
        vis, text = _positions(batch, b)
        x = hidden[0][b]
        n = len(vis)
        r = [sum(_cos(x[p], x[t]) for t in text) / len(text) * (-1 if negate else 1) for p in vis]
        lo, hi = min(r), max(r)
        r = [(v - lo + 1e-6) / (hi - lo) for v in r]
        kernel = torch.tensor([[r[i] * _cos(x[vis[i]], x[vis[j]]) * r[j] for j in range(n)] for i in range(n)],
                              dtype=torch.float64)
        chosen, previous = [], 0.0
        for _ in range(_budget(keep, n)):
            best, best_value = None, -math.inf
            for j in range(n):
                if j in chosen:
                    continue
                idx = chosen + [j]
                sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
                value = float(logdet) if sign > 0 else -math.inf
                if value > best_value:
                    best, best_value = j, value
            assert best_value - previous > math.log(1e-8)  # the greedy gain is well above the exhausted regime
            chosen.append(best)
            previous = best_value
        out.append(sorted(chosen))
    return out


def _reference(name, model, family, batch, keep, layer=2):
    hidden, cache = _hf_run(model, family, batch)
    if name == "dart":
        return _dart_reference(model, hidden, cache, batch, layer, keep)
    if name == "divprune":
        return _divprune_reference(hidden, batch, keep)
    return _cdpruner_reference(hidden, batch, keep)


METHODS = {
    "dart": lambda keep: DART(layer=2, keep=keep),
    "divprune": lambda keep: DivPrune(keep=keep),
    "cdpruner": lambda keep: CDPruner(keep=keep),
}
STAGE = {"dart": 2, "divprune": 0, "cdpruner": 0}


# ---------------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_kept_indices_equal_the_brute_force_reference(tiny_models, family, name):
    model, batch = _batch(tiny_models, family)
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=METHODS[name](KEEP))
    expected = _reference(name, model, family, batch, KEEP)
    got = [r.tolist() for r in out.stats.plan.keep[STAGE[name]]]
    assert got == expected
    assert [len(e) for e in expected] == [_budget(KEEP, n) for n in batch.n_visual]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dart_with_counts_and_other_pivots_equals_the_reference(tiny_models, family):
    """A count budget, another layer and other pivot numbers (text pivots capped by the text available)."""
    model, batch = _batch(tiny_models, family)
    method = DART(layer=3, keep=7, pivot_image=2, pivot_text=5)
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=method)
    hidden, cache = _hf_run(model, family, batch)
    expected = _dart_reference(model, hidden, cache, batch, 3, 7, pivot_image=2, pivot_text=5)
    assert [r.tolist() for r in out.stats.plan.keep[3]] == expected


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cdpruner_negated_relevance_and_divprune_counts_equal_the_reference(tiny_models, family):
    model, batch = _batch(tiny_models, family)
    pm = vlmprune.wrap(model)
    hidden, _ = _hf_run(model, family, batch)
    got = pm(**batch.kwargs(), prune=CDPruner(keep=6, negate_relevance=True)).stats.plan.keep[0]
    assert [r.tolist() for r in got] == _cdpruner_reference(hidden, batch, 6, negate=True)
    got = pm(**batch.kwargs(), prune=DivPrune(keep=9, layer=1)).stats.plan.keep[1]
    assert [r.tolist() for r in got] == _divprune_reference(hidden, batch, 9)


# ---------------------------------------------------------------------------------------- execution
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_tokens_leave_the_sequence_and_each_sample_gets_what_it_gets_alone(tiny_models, family, name):
    model, batch = _batch(tiny_models, family)
    pm = vlmprune.wrap(model)
    method = METHODS[name](KEEP)
    out = pm(**batch.kwargs(), prune=method)
    stage, stats = STAGE[name], out.stats
    kept = [_budget(KEEP, n) for n in batch.n_visual]
    text = (batch.attention_mask.sum(1) - torch.tensor(batch.n_visual)).tolist()
    assert stats.visual_tokens[:, :stage].tolist() == [[n] * stage for n in batch.n_visual]
    assert stats.visual_tokens[:, stage:].tolist() == [[k] * (6 - stage) for k in kept]
    assert stats.kv_entries[:, stage:].tolist() == [[t + k] * (6 - stage) for t, k in zip(text, kept)]
    right = pm(**make_batch(family, model, [3, 6, 1], [4, 2, 7], "right").kwargs(), prune=method)
    assert [r.tolist() for r in right.stats.plan.keep[stage]] == [r.tolist() for r in stats.plan.keep[stage]]
    for b in range(3):
        alone = pm(**sample_inputs(family, batch, b).kwargs(), prune=method)
        assert alone.stats.plan.keep[stage][0].tolist() == stats.plan.keep[stage][b].tolist(), b
        torch.testing.assert_close(alone.last_logits[0], out.last_logits[b], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_keep_all_is_the_unpruned_model(tiny_models, name):
    """keep=1.0 keeps every token (CDPruner on LLaVA-NeXT: 88 tokens > hidden 64, past the kernel's rank)."""
    model, batch = _batch(tiny_models, "llava_next")
    pm = vlmprune.wrap(model)
    out = pm(**batch.kwargs(), prune=METHODS[name](1.0))
    assert [r.tolist() for r in out.stats.plan.keep[STAGE[name]]] == [list(range(n)) for n in batch.n_visual]
    torch.testing.assert_close(out.logits, pm(**batch.kwargs()).logits, atol=1e-5, rtol=0)


def test_dart_reads_the_last_layer_run_when_composed_with_a_layer_method(tiny_models):
    """With layer K-1 skipped, layer K's input is layer K-2's output: DART at K chooses what it chooses at K-1."""
    model, batch = _batch(tiny_models, "qwen2_vl")
    pm = vlmprune.wrap(model)
    composed = pm(**batch.kwargs(), prune=[DART(layer=3, keep=KEEP), vlmprune.Plan(skip=[2, 5])]).stats
    at_two = pm(**batch.kwargs(), prune=DART(layer=2, keep=KEEP)).stats
    assert [r.tolist() for r in composed.plan.keep[3]] == [r.tolist() for r in at_two.plan.keep[2]]
    assert composed.layers_run[:, [2, 5]].sum() == 0 and composed.layers_run.sum() == 3 * 4
    with pytest.raises(vlmprune.VlmpruneError, match="none ran since the start"):
        pm(**batch.kwargs(), prune=[DART(layer=1), vlmprune.Plan(skip=[0])])


@pytest.mark.parametrize("name", ["divprune", "cdpruner"])
def test_compose_with_layer_methods(tiny_models, name):
    model, batch = _batch(tiny_models, "llava")
    pm = vlmprune.wrap(model)
    alone = pm(**batch.kwargs(), prune=METHODS[name](KEEP)).stats.plan
    layers = vlmprune.RandomLayers(keep_layers=4, seed=1)
    both = pm(**batch.kwargs(), prune=[METHODS[name](KEEP), layers]).stats
    assert [r.tolist() for r in both.plan.keep[0]] == [r.tolist() for r in alone.keep[0]]
    assert both.plan.skip == layers.decide(pm, None)[0].skip and both.layers_run.sum() == 3 * 4
    assert both.plan.overhead == alone.overhead


def test_text_only_inputs_keep_everything(tiny_models):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    ids = torch.tensor([[2, 5, 6, 7]])
    for method in (DivPrune(), CDPruner()):
        assert pm(input_ids=ids, prune=method).stats.plan.is_empty
    out = pm(input_ids=ids, prune=DART())
    torch.testing.assert_close(out.logits, pm(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------- FLOPs
def _counted(pm, kwargs, prune):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = pm(**kwargs, prune=prune, logits_to_keep=1)
    return counter.get_total_flops(), out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_flops_match_the_counter_and_include_the_scoring(tiny_models, family, name):
    """Whole call (vision, projector, LM, head, the method's own products) within 3% of FlopCounterMode;
    the method's scoring is exactly what it adds to the same decision replayed as a plain plan."""
    model = tiny_models(family, "eager")  # eager: CPU sdpa's fused kernel is invisible to the counter
    batch = make_batch(family, model, [5], [6], "left")
    pm = vlmprune.wrap(model)
    measured, out = _counted(pm, batch.kwargs(), METHODS[name](KEEP))
    report = vlmprune.flops(pm, out.stats, **batch.kwargs())
    assert abs(float(report.total[0]) - measured) / measured < 0.03
    replayed, _ = _counted(pm, batch.kwargs(), vlmprune.Plan(keep=out.stats.plan.keep))
    assert float(report.scoring[0]) > 0
    assert float(report.scoring[0]) == pytest.approx(measured - replayed, rel=1e-9)


def test_scoring_by_hand():
    """LLaVA tiny (d=64), one sample of 16 visual and 12 text tokens, 6 of them after the image."""
    from vlmprune.methods.base import SampleShape
    from vlmprune.methods.token.cdpruner import dpp_greedy

    k = 5  # 0.3 * 16
    assert DART(keep=KEEP)._overhead([SampleShape(12, 16, 6)], 64) == [(4 + 4) * 16 * 64]
    n, m, d = 16, 6, 64
    _, greedy = dpp_greedy(torch.eye(n, dtype=torch.float64), k, torch.ones(n))
    assert greedy == n * (k - 2) * (k - 1) / 2  # updates 1..k-2 against every token
    assert n * n * d + n * m * d + greedy == 16 * 16 * 64 + 16 * 6 * 64 + 16 * 3 * 4 / 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_flops_budget_prices_the_run(tiny_models, name):
    """AtFlops: the priced share of the chosen keep (no model run) is what the run achieves, scoring included."""
    model, batch = _batch(tiny_models, "qwen2_vl")
    pm = vlmprune.wrap(model)
    budget = vlmprune.AtFlops(METHODS[name](KEEP), share=0.5)
    chosen = budget.resolve(pm, pm.prepare(**batch.kwargs()))
    out = pm(**batch.kwargs(), prune=budget, logits_to_keep=1)
    report = vlmprune.flops(pm, out.stats, vision=False)
    assert report.batch_share == pytest.approx(chosen.share, abs=1e-12)
    assert float(report.scoring.sum()) > 0 and abs(chosen.share - 0.5) < 0.1


# ---------------------------------------------------------------------------------------- configs
def test_by_name_cli_options_and_flops_flag(tmp_path):
    assert vlmprune.build_method("dart", layer=3, keep=0.25) == DART(layer=3, keep=0.25)
    assert configure("divprune", keep=64, layer=None, keep_layers=None, seed=None) == DivPrune(keep=64)
    assert configure("cdpruner", keep=0.5, layer=1, keep_layers=None, seed=None) == CDPruner(keep=0.5, layer=1)
    assert DART().keep == 128 / 576 and DART().pivot_image == DART().pivot_text == 4 and DivPrune().keep == 0.098
    from vlmprune.cli import _decision, build_parser

    base = ["generate", "--model", str(tmp_path / "absent"), "--prompt", "p"]
    for name in METHODS:
        decision = _decision(build_parser().parse_args(base + ["--method", name, "--flops", "0.4"]))
        assert isinstance(decision, vlmprune.AtFlops) and decision.knob == "keep" and decision.method.method_name == name


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DART(keep=1.5), r"keep=1.5 is outside \(0, 1\]"),
        (lambda: DART(keep=0.0), r"outside \(0, 1\]"),
        (lambda: DART(keep=-3), "count must be >= 1"),
        (lambda: DART(layer=0), "layer K must be an integer >= 1"),
        (lambda: DART(pivot_image=-1), "pivot_image must be a token count >= 0"),
        (lambda: DART(pivot_text=1.5), "pivot_text must be a token count >= 0"),
        (lambda: DART(pivot_image=0, pivot_text=0), "at least one pivot"),
        (lambda: DivPrune(keep=1.5), r"outside \(0, 1\]"),
        (lambda: DivPrune(keep="all"), r"ratio in \(0, 1\] or a token count"),
        (lambda: DivPrune(keep=0), "count must be >= 1"),
        (lambda: CDPruner(keep=2.0), r"outside \(0, 1\]"),
        (lambda: CDPruner(keep=True), r"ratio in \(0, 1\] or a token count"),
        (lambda: CDPruner(negate_relevance="yes"), "negate_relevance must be True or False"),
    ],
)
def test_bad_configs_name_the_valid_range(make, message):
    with pytest.raises(vlmprune.VlmpruneError, match=message):
        make()


@pytest.mark.parametrize("name, lowest", [("dart", 1), ("divprune", 0), ("cdpruner", 0)])
def test_budgets_and_layers_checked_against_the_model(tiny_models, name, lowest):
    model, batch = _batch(tiny_models, "llava")
    pm = vlmprune.wrap(model)
    cls = type(METHODS[name](KEEP))
    with pytest.raises(vlmprune.VlmpruneError, match="only 16; use a count <= 16"):
        pm(**batch.kwargs(), prune=cls(keep=40))
    with pytest.raises(vlmprune.VlmpruneError, match=rf"layer=9 is out of range.*{lowest}\.\.5"):
        pm(**batch.kwargs(), prune=cls(layer=9))
    with pytest.raises(vlmprune.VlmpruneError, match=rf"layer=9 is out of range.*{lowest}\.\.5"):
        vlmprune.AtFlops(cls(layer=9), share=0.5).resolve(pm, pm.prepare(**batch.kwargs()))


def test_text_pivots_and_instruction_are_required_when_needed(tiny_models):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3], [0])  # nothing after the image
    with pytest.raises(vlmprune.VlmpruneError, match="CDPruner needs the instruction after the image"):
        pm(**batch.kwargs(), prune=CDPruner())
    with pytest.raises(vlmprune.VlmpruneError, match="pivot_image=0 needs text after the image"):
        pm(**batch.kwargs(), prune=DART(pivot_image=0))
    assert pm(**batch.kwargs(), prune=DART(keep=5)).stats.visual_tokens[0, 2] == 5  # image pivots suffice
