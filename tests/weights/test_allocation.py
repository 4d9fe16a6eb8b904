"""Allocation against independent references: ECoFLaP's released rule equals a loop transcription of
its code and meets the budget in whole weights; the clamped proportional fill equals a float bisection
on the scale and hand-computed cases, and always meets the kept-weight budget; OWL's LOD equals a Python
count and its sparsities equal a transcription of OWL's code; ECoFLaP's first-order scores equal a
manual backward, the zeroth-order ones equal the closed form on a linear loss (per matrix and per
block), track the true per-matrix gradient norm, rank blocks like the first-order ones, and leave the
weights bit-exact; bad inputs raise VlmpruneError naming the fix."""

import math
import random

import pytest
import torch
from torch import nn

from vlmprune.errors import VlmpruneError
from vlmprune.weights import (
    allocate,
    block_sizes,
    ecoflap_allocate,
    ecoflap_keep_counts,
    first_order_scores,
    owl_scores,
    owl_sparsities,
    uniform,
    zeroth_order_scores,
)


def _kept(sparsity, sizes):
    return sum((1 - s) * n for s, n in zip(sparsity, sizes))


def _bisect_fill(scores, target, cap, sizes):
    """Reference: bisect the scale c of keep_i = clamp(c * score_i, 1 - t - cap, 1 - max(0, t - cap))."""
    lo, hi = 1 - target - cap, 1 - max(0.0, target - cap)
    budget = (1 - target) * sum(sizes)

    def keep(c):
        return [min(hi, max(lo, c * s)) for s in scores]

    a, b = 0.0, 1.0
    while _kept([1 - k for k in keep(b)], sizes) < budget:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if _kept([1 - k for k in keep(mid)], sizes) < budget else (a, mid)
    return [1 - k for k in keep((a + b) / 2)]


# ----------------------------------------------------------------------------- allocate / uniform


@pytest.mark.parametrize("seed", range(25))
def test_allocate_meets_budget_and_cap_and_order(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    scores = [rng.choice([rng.uniform(0.01, 10.0), 3.0]) for _ in range(n)]  # some exact ties
    sizes = [rng.randint(1, 10**6) for _ in range(n)]
    target = rng.uniform(0.0, 0.9)
    cap = rng.uniform(0.0, min(0.3, 0.99 - target))
    s = allocate(scores, target, cap=cap, sizes=sizes)

    assert abs(_kept(s, sizes) - (1 - target) * sum(sizes)) <= 1e-9 * sum(sizes)
    assert all(max(0.0, target - cap) - 1e-12 <= v <= target + cap + 1e-12 and 0 <= v < 1 for v in s)
    for i in range(n):
        for j in range(n):
            if scores[i] > scores[j]:
                assert s[i] <= s[j] + 1e-12
            if scores[i] == scores[j]:
                assert s[i] == s[j]
    assert s == pytest.approx(_bisect_fill(scores, target, cap, sizes), abs=1e-9)


@pytest.mark.parametrize(
    "scores, target, cap, sizes, expected",
    [
        # keep in [0.4, 0.6], budget 1.5. Unit 0 would keep 4c = 1.0 (c = 1.5 / 6): capped at 0.6,
        # the rest share 0.9: c = 0.45 (4c = 1.8 >= 0.6 stays capped).
        ([4, 1, 1], 0.5, 0.1, None, [0.4, 0.55, 0.55]),
        # keep in [0.4, 0.6], budget 1.5. Unit 2 at the floor 0.4: 2 * 4c = 1.1, c = 0.1375 (< 0.4 stays floored).
        ([4, 4, 1], 0.5, 0.1, None, [0.45, 0.45, 0.6]),
        # keep in [0.3, 0.7], budget 0.5 * 4 = 2. Uncapped c * (2 + 1 + 2) = 2 gives unit 2 0.8 > 0.7: capped;
        # c * (1 * 2 + 1 * 1) = 2 - 0.7 = 1.3, c = 13/30 (2c = 0.867 stays capped).
        ([1, 1, 2], 0.5, 0.2, [2, 1, 1], [17 / 30, 17 / 30, 0.3]),
        # a zero score pins the unit at target + cap; the others share the rest: 2c = 1.5 - 0.4.
        ([1, 0, 1], 0.5, 0.1, None, [0.45, 0.6, 0.45]),
        # cap = 0 and target = 0: the only allocations within the band.
        ([5, 1, 2], 0.3, 0.0, None, [0.3, 0.3, 0.3]),
        ([5, 1, 2], 0.0, 0.2, None, [0.0, 0.0, 0.0]),
    ],
)
def test_allocate_hand_computed(scores, target, cap, sizes, expected):
    assert allocate(scores, target, cap=cap, sizes=sizes) == pytest.approx(expected, abs=1e-12)


def test_allocate_cap_below():
    # keep in [0.4, 1.0] (cap_below=1): others floored at 0.4, unit 0 keeps 2 - 1.2 = 0.8 (c = 0.08 < 0.4).
    assert allocate([10, 1, 1, 1], 0.5, cap=0.1, cap_below=1.0) == pytest.approx([0.2, 0.6, 0.6, 0.6], abs=1e-12)
    # symmetric default: unit 0 capped at keep 0.6, the others share 1.4 / 3.
    assert allocate([10, 1, 1, 1], 0.5, cap=0.1) == pytest.approx([0.4] + [1 - 1.4 / 3] * 3, abs=1e-12)


def test_equal_scores_give_uniform():
    sizes = [3, 100, 7, 51, 9]
    assert uniform(5, 0.6) == [0.6] * 5
    assert allocate([2.5] * 5, 0.6, cap=0.2, sizes=sizes) == pytest.approx(uniform(5, 0.6), abs=1e-12)
    assert allocate(torch.full((5,), 0.1), 0.6) == pytest.approx(uniform(5, 0.6), abs=1e-12)


def test_allocate_many_units_exact():
    rng = random.Random(7)
    scores = [rng.lognormvariate(0, 1.5) for _ in range(500)]
    sizes = [rng.randint(10**5, 10**7) for _ in range(500)]
    s = allocate(scores, 0.7, cap=0.1, sizes=sizes)
    assert abs(_kept(s, sizes) - 0.3 * sum(sizes)) <= 1e-9 * sum(sizes)
    assert min(s) == pytest.approx(0.6) and max(s) == pytest.approx(0.8)  # both ends of the band are hit


# ----------------------------------------------------------------------------- ECoFLaP's released rule


def _released_keep(scores, target, cap, sizes):
    """Reference: ECoFLaP's compute_the_sparsity_per_group (LAVIS/lavis/compression/pruners/
    layer_single_base_pruner.py lines 247-314) unit by unit in plain loops, with its trimming step
    subtracting (the released line 301 adds by mistake). Written from the released code, not from ours."""
    s_max = target + cap
    budget = int(sum(sizes) * (1 - target))
    keep = [math.ceil(n * (1 - s_max)) for n in sizes]
    live = list(scores)
    while sum(keep) < budget:
        total = sum(live)
        rest = budget - sum(keep)
        for i in range(len(keep)):
            keep[i] += math.ceil(live[i] / total * rest)
        for i in range(len(keep)):
            if keep[i] >= sizes[i]:
                live[i] = 0.0
                keep[i] = sizes[i]
        if sum(keep) > budget:
            need = sum(keep) - budget
            order = sorted(range(len(keep)), key=lambda i: keep[i], reverse=True)  # stable, like torch's
            for i in order:
                can = min(need, keep[i] - int(sizes[i] * (1 - s_max)))
                keep[i] -= can
                need -= can
                if need == 0:
                    break
    return keep


@pytest.mark.parametrize("seed", range(40))
def test_released_rule_equals_a_loop_reference_and_meets_the_budget(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 15)
    scores = [rng.choice([rng.lognormvariate(0, 1.5), 2.0, 0.0]) for _ in range(n)]  # ties and zeros
    if not any(scores):
        scores[0] = 1.0
    sizes = [rng.choice([rng.randint(1, 50), rng.randint(100, 10**6), 4096]) for _ in range(n)]
    target = rng.choice([rng.uniform(0.0, 0.85), 0.5])
    cap = rng.uniform(0.0, min(0.3, 0.99 - target))
    try:
        expected = _released_keep(scores, target, cap, sizes)
    except ZeroDivisionError:  # every scored unit dense and the budget still short: refused
        with pytest.raises(VlmpruneError, match="cannot be met"):
            ecoflap_keep_counts(scores, target, sizes, cap=cap)
        return
    keep = ecoflap_keep_counts(scores, target, sizes, cap=cap)
    assert keep == expected
    s_max = target + cap
    assert sum(keep) == int(sum(sizes) * (1 - target))  # the global budget, in whole weights
    assert all(int(n * (1 - s_max)) <= k <= n for k, n in zip(keep, sizes))  # sparsity in [0, ~s_max]
    sparsity = ecoflap_allocate(scores, target, sizes=sizes, cap=cap)
    assert sparsity == [1 - k / n for k, n in zip(keep, sizes)]
    assert all(0 <= v <= s_max + 1 / n for v, n in zip(sparsity, sizes))
    assert _kept(sparsity, sizes) == pytest.approx(int(sum(sizes) * (1 - target)), abs=1e-6)


def test_released_rule_hand_computed():
    # sizes 1000, target 0.5, s_max 0.6: every unit keeps 400 first, 1200 of the budget 1500; the other 300
    # go 5 : 1 : 0.5, ceil -> 231 + 47 + 24 = 302, two over: taken from the largest unit.
    assert ecoflap_keep_counts([5, 1, 0.5], 0.5, [1000] * 3) == [629, 447, 424]
    # a unit that fills up is closed and its share goes to the others in the next round: sizes 300, 1350,
    # 1350 start at 120, 540, 540; of the 300 left unit 0 gets 270 > its 180 of room and closes at 300, the
    # others 15 each (555); the 90 still left go 1 : 1 to the two open units.
    assert ecoflap_keep_counts([9, 0.5, 0.5], 0.5, [300, 1350, 1350]) == [300, 600, 600]
    # a zero score stays at s_max; scores proportional to the sizes give the uniform allocation
    assert ecoflap_allocate([0, 1], 0.5, sizes=[1000, 1000]) == [0.6, 0.4]
    assert ecoflap_allocate([1, 2, 3], 0.5, sizes=[1000, 2000, 3000]) == [0.5, 0.5, 0.5]
    # unlike the clamped rule, only sparsity >= 0 bounds a unit below. Target 0.3, s_max 0.4: units of 100
    # keep 60 first (240 of 280); of the 40 left unit 0 gets 39, the others 1 each: 2 over, taken from unit 0.
    assert ecoflap_keep_counts([100, 1, 1, 1], 0.3, [100] * 4) == [97, 61, 61, 61]
    assert min(allocate([100, 1, 1, 1], 0.3, cap=0.1)) == pytest.approx(0.2)  # clamped: within target +- cap
    # and with room, an important unit goes dense: s_max 0.9, unit 0 fills up and closes at 100
    assert ecoflap_keep_counts([100, 1, 1, 1], 0.3, [100] * 4, cap=0.6) == [100, 60, 60, 60]


# ----------------------------------------------------------------------------- OWL


def _brute_lod(parts, m):
    values = [v for p in parts for v in p.reshape(-1).tolist()]
    mean = sum(values) / len(values)
    return sum(v > m * mean for v in values) / len(values)


def test_owl_scores_equal_brute_force_count():
    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(5):
        a = torch.rand(16, 24, generator=gen) ** 3 * (1 + i)
        a.view(-1)[torch.randperm(a.numel(), generator=gen)[: 3 * i]] *= 40  # plant outliers
        layers.append([a, torch.rand(8, 16, generator=gen)] if i % 2 else a)
    for m in (3.0, 5.0):
        expected = [_brute_lod(layer if isinstance(layer, list) else [layer], m) for layer in layers]
        assert owl_scores(layers, m=m) == pytest.approx(expected, abs=0)


def test_owl_scores_planted_outliers():
    # 1000 scores in [0, 1) plus k at 1000: mean ~ 0.5 + k, so 5 * mean < 1000 and exactly k are outliers.
    gen = torch.Generator().manual_seed(1)
    layers = [torch.cat([torch.rand(1000 - k, generator=gen), torch.full((k,), 1000.0)]) for k in (1, 4, 2)]
    assert owl_scores(layers) == pytest.approx([0.001, 0.004, 0.002], abs=0)


def test_owl_sparsities_follow_the_reference_rule():
    lod = [0.01, 0.05, 0.02, 0.08, 0.03]
    target, lam = 0.7, 0.08
    s = owl_sparsities(lod, target, lam=lam)
    lo, hi = min(lod), max(lod)
    x = [(v - lo) / (hi - lo) * 2 * lam for v in lod]  # OWL's code: min-max to [0, 2 lam], shift to mean 1 - target
    assert s == pytest.approx([1 - (v - sum(x) / len(x) + 1 - target) for v in x], abs=1e-12)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
    assert all(target - 2 * lam <= v <= target + 2 * lam for v in s)
    order = sorted(range(5), key=lambda i: lod[i])
    assert all(s[a] > s[b] for a, b in zip(order, order[1:]))  # more outliers -> lower sparsity


def _released_owl(lod, target, lam):
    """Reference: OWL's lib/prune_all.py lines 962-966 and 1054-1058 (prune_wanda_outlier), in plain Python."""
    lo, hi = min(lod), max(lod)
    ratio = [(v - lo) * (1 / (hi - lo) * lam * 2) for v in lod]
    mean = sum(ratio) / len(ratio)
    ratio = [r - mean + (1 - target) for r in ratio]
    return [0.01 if 1 - r <= 0 else 1 - r for r in ratio]


@pytest.mark.parametrize("seed", range(20))
def test_owl_sparsities_equal_the_released_code(seed):
    rng = random.Random(seed)
    lod = [rng.uniform(0, 12) for _ in range(rng.randint(2, 40))]  # percent, as the released code counts
    target, lam = rng.uniform(0.2, 0.8), rng.choice([0.08, rng.uniform(0.0, 0.1)])
    expected = _released_owl(lod, target, lam)
    assert owl_sparsities(lod, target, lam=lam) == pytest.approx(expected, abs=1e-12)
    assert owl_sparsities([v / 100 for v in lod], target, lam=lam) == pytest.approx(expected, abs=1e-12)  # scale-free
    assert owl_sparsities(lod, target, lam=lam, sizes=[7] * len(lod)) == pytest.approx(expected, abs=1e-12)
    # lambda bounds the spread (max - min = 2 lam), not the distance from the target
    assert max(expected) - min(expected) == pytest.approx(2 * lam, abs=1e-12)


def test_owl_refuses_where_the_released_code_clips():
    lod, target, lam = [0.0, 0.0, 0.0, 1.0], 0.1, 0.08  # mean x = 0.04: the top layer at 0.1 - 0.12 < 0
    assert _released_owl(lod, target, lam)[-1] == 0.01  # the released code: 0.01, and the budget is missed
    with pytest.raises(VlmpruneError, match="use a lam of at most"):
        owl_sparsities(lod, target, lam=lam)


def test_owl_sparsities_band_and_sizes():
    # LODs spread symmetrically: the mean of x sits at lam, so the band is exactly [t - lam, t + lam].
    assert owl_sparsities([0.0, 0.1, 0.2], 0.5, lam=0.08) == pytest.approx([0.58, 0.5, 0.42], abs=1e-12)
    sizes = [10, 1, 3, 5]
    s = owl_sparsities([0.3, 0.1, 0.0, 0.2], 0.6, lam=0.05, sizes=sizes)
    assert _kept(s, sizes) == pytest.approx(0.4 * sum(sizes), rel=1e-12)
    assert owl_sparsities([0.2] * 4, 0.6) == uniform(4, 0.6)


# ----------------------------------------------------------------------------- ECoFLaP scores


class _Residual(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * torch.tanh(self.lin(x))


def _mlp(scales=(0.05, 0.15, 0.4, 0.8, 1.5, 3.0), dim=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[_Residual(dim, s) for s in scales])
    x, y = torch.randn(32, dim), torch.randn(32, dim)
    return model, lambda: ((model(x) - y) ** 2).mean()


def _ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def _spearman(a, b):
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def test_first_order_equals_manual_backward():
    model, loss = _mlp()
    model[2].lin.weight.requires_grad_(False)  # restored to False afterwards
    model2, loss2 = _mlp(seed=0)
    model2.load_state_dict(model.state_dict())
    batches = [loss, lambda: loss() * 3]
    got = first_order_scores(batches, list(model))

    expected = [0.0] * len(model2)
    for fn in (loss2, lambda: loss2() * 3):
        model2.zero_grad()
        fn().backward()
        for b, block in enumerate(model2):
            expected[b] += sum((p.detach() * p.grad).abs().sum().item() for p in block.parameters()) / 2
    assert got == pytest.approx(expected, rel=1e-6)
    assert model[2].lin.weight.requires_grad is False and model[2].lin.bias.requires_grad is True


def test_zeroth_order_restores_weights_bit_exactly():
    model, loss = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = zeroth_order_scores([loss, lambda: 2 * loss()], model, n_directions=3, seed=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(s > 0 for s in scores) and len(scores) == 6

    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("calibration batch failed")
        return loss()

    with pytest.raises(RuntimeError, match="calibration batch failed"):
        zeroth_order_scores(failing, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zeroth_order_is_exact_on_a_linear_loss():
    # L(w) = a . w: the central difference is exact, g = a . z, with z read off the perturbed weights.
    gen = torch.Generator().manual_seed(3)
    w1 = nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    a1, a2 = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    w0 = [w1.detach().clone(), w2.detach().clone()]
    seen = []

    def loss():
        seen.append([w1.detach().clone(), w2.detach().clone()])
        return (a1 * w1).sum() + (a2 * w2).sum()

    eps = 1e-3
    for score_kind in ("grad-weight", "grad"):
        seen.clear()
        (score,) = zeroth_order_scores(loss, [[w1, w2]], eps=eps, seed=11, mode="block", score=score_kind)
        plus, minus = seen
        z = [(p - w) / eps for p, w in zip(plus, w0)]
        assert all(torch.allclose(m, w - eps * zz, rtol=0, atol=1e-12) for m, w, zz in zip(minus, w0, z))
        g = sum((a * zz).sum().item() for a, zz in zip((a1, a2), z))
        spread = sum((w.abs() * zz.abs()).sum().item() for w, zz in zip(w0, z))
        assert score == pytest.approx(abs(g) * spread if score_kind == "grad-weight" else abs(g), rel=1e-8)
    # per matrix (the default): one tensor moves per pair of forwards, the other stays; the block's
    # score is the sum of the tensors' |g|
    seen.clear()
    (score,) = zeroth_order_scores(loss, [[w1, w2]], eps=eps, seed=11)
    assert len(seen) == 4
    expected = 0.0
    for k, (plus, minus) in enumerate([seen[0:2], seen[2:4]]):
        other = 1 - k
        assert torch.equal(plus[other], w0[other]) and torch.equal(minus[other], w0[other])
        z = (plus[k] - w0[k]) / eps
        assert torch.allclose(minus[k], w0[k] - eps * z, rtol=0, atol=1e-12)
        expected += abs(((a1, a2)[k] * z).sum().item())
    assert score == pytest.approx(expected, rel=1e-8)
    assert torch.equal(w1.detach(), w0[0]) and torch.equal(w2.detach(), w0[1])


def test_zeroth_order_is_reproducible():
    model, loss = _mlp()
    a = zeroth_order_scores(loss, model, n_directions=2, seed=1)
    assert zeroth_order_scores(loss, model, n_directions=2, seed=1) == a
    assert zeroth_order_scores(loss, model, n_directions=2, seed=2) != a


@pytest.mark.parametrize("mode, score", [("per-matrix", "grad"), ("block", "grad-weight")])
def test_zeroth_order_ranks_blocks_like_first_order(mode, score):
    model, loss = _mlp()
    blocks = list(model)
    true = first_order_scores(loss, blocks, score="grad" if score == "grad" else "grad-weight")
    estimate = zeroth_order_scores(loss, blocks, eps=1e-3, n_directions=64, seed=0, mode=mode, score=score)
    assert _spearman(true, estimate) >= 0.8
    assert block_sizes(blocks) == [12 * 12 + 12] * 6


def test_per_matrix_estimate_tracks_the_true_gradient_norm():
    """g = grad . z with z ~ N(0, I) is N(0, ||grad||^2), so E|g| = sqrt(2 / pi) ||grad||_2: with eps small
    (float64) and many directions, each matrix's mean |g| matches its true gradient norm."""
    model, loss = _mlp(dim=8)
    model.double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)

    def mse():
        return ((model(x) - y) ** 2).mean()

    weights = [block.lin.weight for block in model]
    mse().backward()
    norms = [w.grad.norm().item() for w in weights]
    model.zero_grad()
    estimate = zeroth_order_scores(mse, [[w] for w in weights], eps=1e-6, n_directions=600, seed=0)
    expected = [(2 / math.pi) ** 0.5 * n for n in norms]
    assert _spearman(estimate, norms) == 1.0
    assert estimate == pytest.approx(expected, rel=0.15)  # coefficient of variation of |g| ~0.76 / sqrt(600)
    # the block's score sums its matrices': blocks of two matrices get the sum of their matrices' means
    pairs = zeroth_order_scores(mse, [weights[:2], weights[2:4], weights[4:]], eps=1e-6, n_directions=600, seed=0)
    assert pairs == pytest.approx([estimate[0] + estimate[1], estimate[2] + estimate[3], estimate[4] + estimate[5]], rel=1e-12)


def test_first_order_grad_only_equals_manual_backward():
    model, loss = _mlp()
    model2, loss2 = _mlp(seed=0)
    got = first_order_scores([loss, lambda: -loss()], list(model), score="grad")
    model2.zero_grad()
    loss2().backward()
    expected = [sum(p.grad.abs().sum().item() for p in block.parameters()) for block in model2]  # |g| = |-g|
    assert got == pytest.approx(expected, rel=1e-6)


def test_scores_feed_allocate():
    model, loss = _mlp()
    totals, sizes = first_order_scores(loss, model), block_sizes(model)
    s = allocate([t / n for t, n in zip(totals, sizes)], 0.5, cap=0.1, sizes=sizes)
    assert _kept(s, sizes) == pytest.approx(0.5 * sum(sizes), rel=1e-12)
    assert s[0] == pytest.approx(0.6) and s[-1] == pytest.approx(0.4)  # least / most important block


# ----------------------------------------------------------------------------- bad inputs


def _shared_blocks():
    lin = nn.Linear(2, 2)
    return [[lin.weight], [lin.weight, lin.bias]]


BAD = [
    (lambda: allocate([1, 2], 1.0), r"target=1.0 is outside \[0, 1\)"),
    (lambda: allocate([1, 2], -0.1), r"outside \[0, 1\)"),
    (lambda: allocate([1, 2], 0.5, cap=-0.1), r"cap=-0.1 must be a finite number >= 0"),
    (lambda: allocate([1, 2], 0.5, cap_below=float("nan")), r"cap_below=nan"),
    (lambda: allocate([1, -2], 0.5), r"scores must be >= 0 with at least one > 0"),
    (lambda: allocate([0, 0], 0.5), r"at least one > 0"),
    (lambda: allocate([1, float("nan")], 0.5), r"NaN or infinite.*calibration"),
    (lambda: allocate([1, 2], 0.5, sizes=[1, 2, 3]), r"3 values but there are 2 units; give exactly one per unit"),
    (lambda: allocate([1, 2], 0.5, sizes=[1, 0]), r"sizes must all be > 0"),
    (lambda: allocate([1, 0, 0], 0.5, cap=0.1), r"cannot be met with cap=0.1.*raise cap"),
    (lambda: allocate([1, 2], 0.95, cap=0.1), r"must stay below 1.*use cap < 0.05"),
    (lambda: allocate([], 0.5), r"empty"),
    (lambda: uniform(0, 0.5), r"positive int"),
    (lambda: ecoflap_allocate([1, 2], 0.5, sizes=None), r"counts whole weights: give sizes"),
    (lambda: ecoflap_allocate([1, 2], 0.5, sizes=[10, 2.5]), r"positive whole numbers"),
    (lambda: ecoflap_allocate([1, 2], 0.5, sizes=[10]), r"1 values but there are 2 units"),
    (lambda: ecoflap_allocate([1, 2], 0.95, sizes=[10, 10]), r"must stay below 1.*use cap < 0.05"),
    (lambda: ecoflap_allocate([1, -1], 0.5, sizes=[10, 10]), r"scores must be >= 0"),
    (lambda: ecoflap_keep_counts([1, 0, 0], 0.5, [10, 100, 100]), r"cannot be met with cap=0.1.*raise cap"),
    (lambda: zeroth_order_scores(lambda: 1.0, [nn.Linear(2, 2)], mode="joint"), r"mode='joint' is not one of per-matrix, block"),
    (lambda: zeroth_order_scores(lambda: 1.0, [nn.Linear(2, 2)], score="taylor"), r"score='taylor' is not one of grad, grad-weight"),
    (lambda: first_order_scores(lambda: 1.0, [nn.Linear(2, 2)], score="w"), r"is not one of grad, grad-weight"),
    (lambda: owl_sparsities([0.0, 0.5, 1.0], 0.05, lam=0.08), r"use a lam of at most 0.05"),
    (lambda: owl_sparsities([0.1, 0.2], 0.5, lam=-1), r"lam=-1"),
    (lambda: owl_scores([torch.ones(3), []]), r"layer 1"),
    (lambda: owl_scores(torch.ones(3)), r"one entry per layer"),
    (lambda: zeroth_order_scores(lambda: torch.tensor(1.0), [nn.Linear(2, 2)], eps=0), r"eps=0 must be"),
    (lambda: zeroth_order_scores(lambda: torch.tensor(1.0), [nn.Linear(2, 2)], n_directions=0), r"n_directions=0"),
    (lambda: zeroth_order_scores(lambda: torch.ones(2), [nn.Linear(2, 2)]), r"one scalar loss"),
    (lambda: zeroth_order_scores(lambda: 1.0, _shared_blocks()), r"shares a parameter"),
    (lambda: zeroth_order_scores(lambda: 1.0, [nn.ReLU()]), r"block 0 has no parameters"),
    (lambda: zeroth_order_scores(None, [nn.Linear(2, 2)]), r"loss_fn must be a callable"),
    (lambda: first_order_scores(lambda: torch.tensor(1.0), [nn.Linear(2, 2)]), r"do not wrap loss_fn in torch.no_grad"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_inputs(call, message):
    with pytest.raises(VlmpruneError, match=message):
        call()
