"""Local pruners against brute force: masks equal a Python sort of the scores (ties included), the
requested sparsity / N:M pattern holds exactly, SparseGPT equals a naive column-by-column OBS with
explicit inverses and beats Wanda's reconstruction error; InputStats equals direct formulas; errors."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from vlmprune.errors import VlmpruneError
from vlmprune.weights import InputStats, apply_mask, magnitude_mask, parse_nm, sparsegpt_prune, wanda_mask

NM = ["2:4", "4:8"]


def _tied(rows, cols, seed=0):
    """Small-integer weights and norms: many exactly tied scores."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-3, 4, (rows, cols), generator=gen).float()
    norm = torch.randint(1, 4, (cols,), generator=gen).float()
    return weight, norm


def _scores(name, weight, norm):
    w = weight.tolist()
    return [[abs(x) * (float(norm[j]) if name == "wanda" else 1.0) for j, x in enumerate(row)] for row in w]


def _mask(name, weight, norm, **kw):
    return magnitude_mask(weight, **kw) if name == "magnitude" else wanda_mask(weight, norm, **kw)


def _brute_keep(scores, k, per):
    """Prune the k lowest by (score, row-major index), per row or across the matrix."""
    rows, cols = len(scores), len(scores[0])
    keep = [[True] * cols for _ in range(rows)]
    if per == "row":
        for r in range(rows):
            for j in sorted(range(cols), key=lambda j: (scores[r][j], j))[:k]:
                keep[r][j] = False
    else:
        cells = sorted(((scores[r][j], r, j) for r in range(rows) for j in range(cols)))[:k]
        for _, r, j in cells:
            keep[r][j] = False
    return torch.tensor(keep)


def _brute_nm(scores, n, m):
    keep = []
    for row in scores:
        out = [True] * len(row)
        for g in range(0, len(row), m):
            for j in sorted(range(g, g + m), key=lambda j: (row[j], j))[: m - n]:
                out[j] = False
        keep.append(out)
    return torch.tensor(keep)


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
@pytest.mark.parametrize("per", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.95])
def test_unstructured_masks_equal_brute_force(name, per, sparsity):
    weight, norm = _tied(6, 20)
    keep = _mask(name, weight, norm, sparsity=sparsity, per=per)
    n = 20 if per == "row" else weight.numel()
    k = int(Fraction(str(sparsity)) * n)  # exact floor, no float round-off (0.7 * 20 = 14)
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert torch.equal(keep, _brute_keep(_scores(name, weight, norm), k, per))
    pruned = (~keep).sum(1) if per == "row" else (~keep).sum()[None]
    assert (pruned == k).all()


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
@pytest.mark.parametrize("nm", NM)
def test_nm_masks_keep_the_top_n_of_every_group(name, nm):
    n, m = parse_nm(nm)
    weight, norm = _tied(5, 24)
    keep = _mask(name, weight, norm, nm=nm)
    assert (keep.reshape(5, -1, m).sum(-1) == n).all()
    assert torch.equal(keep, _brute_nm(_scores(name, weight, norm), n, m))


def _layer(rows=16, cols=32, samples=256, seed=0, dead=()):
    """A weight and correlated calibration inputs X = Z @ A (so the OBS update matters)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x = torch.randn(samples, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    x[:, list(dead)] = 0
    stats = InputStats(cols, hessian=True, dtype=torch.float64)
    stats.add(x)
    return weight, x, stats


def _naive_sparsegpt(weight, hessian, sparsity, nm, block, damp=0.01):
    """SparseGPT without the Cholesky / lazy-batch tricks: for each column j, F = H[j:, j:] and the OBS
    step uses inv(F) explicitly; masks chosen as the paper says, on the weights updated so far."""
    W, H = weight.double().clone(), hessian.double().clone()
    rows, cols = W.shape
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diag().mean() * torch.eye(cols, dtype=H.dtype)
    finv = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    d = [float(f[0, 0]) for f in finv]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if sparsity is not None and j % block == 0:
            width = min(block, cols - j)
            cells = sorted((float(W[r, c]) ** 2 / d[c], r, c) for r in range(rows) for c in range(j, j + width))
            for _, r, c in cells[: int(Fraction(str(sparsity)) * rows * width)]:
                keep[r, c] = False
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            for r in range(rows):
                for c in sorted(range(j, j + m), key=lambda c: (float(W[r, c]) ** 2 / d[c], c))[: m - n]:
                    keep[r, c] = False
        q = W[:, j] * keep[:, j]
        W[:, j:] -= ((W[:, j] - q) / finv[j][0, 0])[:, None] * finv[j][0][None, :]
        W[:, j] = q
    return W, keep


@pytest.mark.parametrize("sparsity, nm, block", [(0.5, None, 8), (0.3, None, 12), (None, "2:4", 8), (None, "4:8", 32)])
def test_sparsegpt_equals_naive_obs(sparsity, nm, block):
    weight, _, stats = _layer(rows=8, cols=32, dead=(5,))
    new, keep = sparsegpt_prune(weight.double(), stats.hessian, sparsity=sparsity, nm=nm, block_size=block)
    ref_w, ref_keep = _naive_sparsegpt(weight, stats.hessian, sparsity, nm and parse_nm(nm), block)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref_w, rtol=1e-9, atol=1e-9)
    assert (new[~keep] == 0).all() and (new[:, 5] == 0).all()  # pruned and dead-input weights are zero


def test_sparsegpt_unstructured_count_is_exact_per_block():
    weight, _, stats = _layer(rows=8, cols=40)
    new, keep = sparsegpt_prune(weight, stats.hessian.float(), sparsity=0.3, block_size=16)
    assert new.dtype == weight.dtype and keep.shape == weight.shape
    for i1, width in [(0, 16), (16, 16), (32, 8)]:
        assert int((~keep[:, i1 : i1 + width]).sum()) == int(Fraction(3, 10) * 8 * width)  # 38, 38, 19
    assert (new[~keep] == 0).all()


@pytest.mark.parametrize("nm", NM)
def test_sparsegpt_nm_pattern_holds_in_every_group(nm):
    n, m = parse_nm(nm)
    weight, _, stats = _layer(rows=8, cols=32)
    new, keep = sparsegpt_prune(weight, stats.hessian.float(), nm=nm, block_size=16)
    assert (keep.reshape(8, -1, m).sum(-1) == n).all()
    assert ((new != 0).reshape(8, -1, m).sum(-1) <= n).all() and (new[~keep] == 0).all()


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(nm="2:4")])
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    weight, x, stats = _layer(rows=32, cols=64, samples=384)
    wanda = weight * wanda_mask(weight, stats.norm, **pattern)
    sparse, _ = sparsegpt_prune(weight, stats.hessian.float(), block_size=32, **pattern)

    def error(w):
        return float(torch.linalg.norm(x @ weight.T - x @ w.T))

    assert error(sparse) < 0.9 * error(wanda)  # ~0.8 over seeds 0-7, (error(sparse), error(wanda))


def test_sparsegpt_at_zero_sparsity_keeps_the_weight():
    weight, _, stats = _layer()
    new, keep = sparsegpt_prune(weight, stats.hessian.float(), sparsity=0.0)
    assert keep.all()
    torch.testing.assert_close(new, weight)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_input_stats_equal_direct_formulas(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(2, 5, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(1, 3, 4, 12, generator=gen)]
    stats = InputStats(12, hessian=True, dtype=dtype)
    linear = nn.Linear(12, 3)
    handle = linear.register_forward_pre_hook(stats.hook)
    linear(chunks[0])  # through a hook, as calibration will
    handle.remove()
    for chunk in chunks[1:]:
        stats.add(chunk)
    x = torch.cat([c.reshape(-1, 12) for c in chunks]).double()
    assert stats.n == 29
    torch.testing.assert_close(stats.norm.double(), torch.linalg.norm(x, dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.hessian.double(), 2 / 29 * x.T @ x, rtol=tol, atol=tol)


def test_apply_mask_zeroes_in_place():
    linear = nn.Linear(8, 4)
    keep = magnitude_mask(linear.weight, nm="2:4")
    kept = linear.weight.detach().clone()
    assert apply_mask(linear, keep) is linear.weight
    assert torch.equal(linear.weight.detach(), kept * keep)


W16 = torch.ones(4, 16)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: magnitude_mask(W16, sparsity=1.0), "[0, 1)"),
        (lambda: magnitude_mask(W16, sparsity=-0.1), "[0, 1)"),
        (lambda: magnitude_mask(W16, nm="4:4"), "0 < N < M"),
        (lambda: magnitude_mask(W16, nm="3:2"), "0 < N < M"),
        (lambda: magnitude_mask(W16, nm="a:b"), "'2:4'"),
        (lambda: magnitude_mask(W16, nm=(2, 0)), "0 < N < M"),
        (lambda: magnitude_mask(torch.ones(4, 10), nm="2:4"), "divisible"),
        (lambda: magnitude_mask(W16), "exactly one"),
        (lambda: magnitude_mask(W16, sparsity=0.5, nm="2:4"), "exactly one"),
        (lambda: magnitude_mask(torch.ones(16), sparsity=0.5), "2-D"),
        (lambda: magnitude_mask(W16, sparsity=0.5, per="column"), "'row'"),
        (lambda: wanda_mask(W16, torch.ones(15), sparsity=0.5), "in_features=16"),
        (lambda: sparsegpt_prune(W16, torch.eye(15), sparsity=0.5), "[16, 16]"),
        (lambda: sparsegpt_prune(W16, torch.eye(16), nm="2:4", block_size=6), "multiple of M"),
        (lambda: sparsegpt_prune(W16, torch.zeros(16, 16), sparsity=0.5), "no calibration input"),
        (lambda: sparsegpt_prune(torch.ones(1, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), sparsity=0.5), "larger damp"),
        (lambda: InputStats(16).hessian, "hessian=True"),
        (lambda: InputStats(16).add(torch.ones(3, 8)), "in_features=16"),
        (lambda: apply_mask(W16.clone(), torch.ones(4, 8, dtype=torch.bool)), "shape"),
    ],
)
def test_bad_inputs_raise_helpful_errors(call, word):
    with pytest.raises(VlmpruneError) as info:
        call()
    assert word in str(info.value)


def test_prune_lowest_is_a_stable_sorts_first_k():
    """The selection (k-th value, ties by index) against the definition: the first k of a stable sort."""
    from vlmprune.weights.local import prune_lowest

    def reference(scores, k):
        lowest = scores.sort(dim=-1, stable=True).indices[..., :k]
        return torch.ones_like(scores, dtype=torch.bool).scatter_(-1, lowest, False)

    gen = torch.Generator().manual_seed(0)
    cases = [torch.rand(7, 33, generator=gen), (torch.rand(7, 33, generator=gen) * 3).round(),  # many ties
             torch.zeros(3, 10), torch.rand(5, 8, 4, generator=gen)]  # all tied; N:M groups
    nan = torch.rand(4, 12, generator=gen)
    nan[1, 3] = float("nan")
    for scores in cases + [nan]:
        for k in range(0, scores.shape[-1] + 1):
            assert torch.equal(prune_lowest(scores, k), reference(scores, k)), (scores.shape, k)
