"""stratified-random: the tile-balanced rule checked against a brute-force ordering of the tiles' tokens,
the same sample's choice alone and in a padded batch, physical drops, and bad budgets."""

from types import SimpleNamespace

import pytest
import torch

import vlmprune
from conftest import FAMILIES, make_batch, sample_inputs
from vlmprune.methods.registry import build_method, configure
from vlmprune.methods.tiles import tiles
from vlmprune.models.base import PreparedInputs

GRID = (12, 12)
N = GRID[0] * GRID[1]
TEXT = 5


def _grid_prep(n_samples: int = 2, dim: int = 8) -> PreparedInputs:
    """A hand-made batch: per sample a few text tokens, then 12 x 12 visual tokens on one grid."""
    gen = torch.Generator().manual_seed(0)
    length = TEXT + N
    ids = torch.randint(3, 200, (n_samples, length), generator=gen)
    visual = torch.zeros(n_samples, length, dtype=torch.bool)
    visual[:, TEXT:] = True
    return PreparedInputs(
        input_ids=ids,
        inputs_embeds=torch.randn(n_samples, length, dim, generator=gen),
        position_ids=torch.arange(length).expand(1, n_samples, length),
        attention_mask=torch.ones(n_samples, length, dtype=torch.bool),
        visual_mask=visual,
        visual_grids=[GRID] * n_samples,
    )


def _first_by_rounds(logits: list[float], tile: list[int], count: int, best_first: bool) -> set[int]:
    """Brute force: every token keyed (its place in its own tile by logit, then its logit); the first
    `count` -- all the tiles' best (or worst) tokens before any tile's second."""
    keyed = []
    for t in set(tile):
        members = sorted((i for i in range(len(tile)) if tile[i] == t), key=lambda i: logits[i], reverse=best_first)
        keyed += [(place, -logits[i] if best_first else logits[i], i) for place, i in enumerate(members)]
    return {i for _, _, i in sorted(keyed)[:count]}


def _occupancy(chosen: set[int], tile: list[int], m: int) -> list[int]:
    counts = [0] * m
    for i in chosen:
        counts[tile[i]] += 1
    return counts


@pytest.mark.parametrize("k", [8, 11, 33, 9, 24, 36, 20, 50, 100, 130])
def test_every_tile_gets_a_token_before_any_gets_a_second(k):
    prep = _grid_prep()
    method = vlmprune.StratifiedRandom(keep=k, seed=5)
    plan, policies = method.decide(SimpleNamespace(n_layers=4), prep)
    assert policies == [] and list(plan.keep) == [0]
    logits = method.logits(prep)
    for b, row in enumerate(plan.keep[0]):
        kept = set(row.tolist())
        assert len(kept) == k
        scores = logits[b].tolist()
        if 2 * k > N:  # above half the rule applies to the dropped tokens: the worst of every tile first
            dropped = set(range(N)) - kept
            tile_ids, _ = tiles(N, GRID, N - k)
            tile = tile_ids.tolist()
            counts = _occupancy(dropped, tile, max(tile) + 1)
            assert max(counts) - min(counts) <= 1, counts
            assert dropped == _first_by_rounds(scores, tile, N - k, best_first=False)
            continue
        tile_ids, _ = tiles(N, GRID, k)
        tile = tile_ids.tolist()
        m = max(tile) + 1
        counts = _occupancy(kept, tile, m)
        if k >= m:
            assert max(counts) - min(counts) <= 1, counts
            assert kept == _first_by_rounds(scores, tile, k, best_first=True)
        else:  # fewer tokens than tiles: distinct tiles, each giving its best token
            assert max(counts) == 1, counts
            for i in kept:
                assert scores[i] == max(s for s, t in zip(scores, tile) if t == tile[i])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_gets_the_same_tokens_alone_and_in_a_padded_batch(tiny_models, family):
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [3, 6, 1], [4, 2, 7], "left")
    right = make_batch(family, model, [3, 6, 1], [4, 2, 7], "right")
    method = vlmprune.StratifiedRandom(keep=0.4, seed=3)
    together = method.decide(pm, pm.prepare(**batch.kwargs()))[0].keep[0]
    padded_right = method.decide(pm, pm.prepare(**right.kwargs()))[0].keep[0]
    for b in range(len(batch.n_visual)):
        alone = method.decide(pm, pm.prepare(**sample_inputs(family, batch, b).kwargs()))[0].keep[0]
        assert alone[0].tolist() == together[b].tolist() == padded_right[b].tolist()
    # a different position in the batch: the last sample first
    flipped = method.decide(pm, pm.prepare(**sample_inputs(family, batch, 2).kwargs()))[0].keep[0]
    assert flipped[0].tolist() == together[2].tolist()
    other = vlmprune.StratifiedRandom(keep=0.4, seed=4).decide(pm, pm.prepare(**batch.kwargs()))[0].keep[0]
    assert [r.tolist() for r in other] != [r.tolist() for r in together]


def test_different_seeds_and_samples_give_different_choices():
    prep = _grid_prep(n_samples=3)
    pm = SimpleNamespace(n_layers=4)
    rows = {s: [r.tolist() for r in vlmprune.StratifiedRandom(keep=30, seed=s).decide(pm, prep)[0].keep[0]] for s in range(4)}
    assert len({str(r) for r in rows.values()}) == 4  # every seed its own choice
    assert len({str(r) for r in rows[0]}) == 3  # and every sample its own under one seed
    assert rows[0] == [r.tolist() for r in vlmprune.StratifiedRandom(keep=30, seed=0).decide(pm, prep)[0].keep[0]]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
@pytest.mark.parametrize("layer", [0, 2])
def test_dropped_tokens_leave_the_sequence(tiny_models, family, layer):
    model = tiny_models(family)
    batch = make_batch(family, model, [3, 6], [4, 2], "left")
    method = vlmprune.StratifiedRandom(keep=0.25, layer=layer, seed=1)
    out = vlmprune.wrap(model)(**batch.kwargs(), prune=method)
    kept = [max(1, round(0.25 * n)) for n in batch.n_visual]
    assert [r.numel() for r in out.stats.plan.keep[layer]] == kept
    vis = out.stats.visual_tokens
    assert vis[:, :layer].tolist() == [[n] * layer for n in batch.n_visual]
    assert vis[:, layer:].tolist() == [[k] * (vis.shape[1] - layer) for k in kept]


def test_built_by_name_by_cli_options_and_at_a_flops_budget(tiny_models):
    assert build_method("stratified-random", keep=0.5, seed=2) == vlmprune.StratifiedRandom(keep=0.5, seed=2)
    assert configure("stratified-random", keep=8, layer=1, seed=7, keep_layers=None) == vlmprune.StratifiedRandom(8, 1, 7)
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3, 6], [4, 2], "left")
    pm = vlmprune.wrap(model)
    budget = vlmprune.AtFlops(vlmprune.StratifiedRandom(seed=1), share=0.5)
    chosen = budget.resolve(pm, pm.prepare(**batch.kwargs()))
    out = pm(**batch.kwargs(), prune=budget, logits_to_keep=1)
    assert vlmprune.flops(pm, out.stats, vision=False).batch_share == pytest.approx(chosen.share, abs=1e-12)
    assert out.stats.visual_tokens[:, 0].tolist() == [round(chosen.value * n) for n in batch.n_visual]


@pytest.mark.parametrize("keep, message", [(0, "count must be >= 1"), (1.5, r"outside \(0, 1\]"), (0.0, r"outside \(0, 1\]"), ("all", "ratio")])
def test_bad_keep_is_refused(keep, message):
    with pytest.raises(vlmprune.VlmpruneError, match=message):
        vlmprune.StratifiedRandom(keep=keep)


def test_a_count_above_a_samples_visual_tokens_is_refused(tiny_models):
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3], [4], "left")
    with pytest.raises(vlmprune.VlmpruneError, match="only 16"):
        vlmprune.wrap(model)(**batch.kwargs(), prune=vlmprune.StratifiedRandom(keep=40))
