"""Tile-balanced selection: a top-k that covers the image grid before it concentrates.

For a budget of k of n visual tokens the image grid is cut into about k near-square tiles; the best
token (by some score) of every tile is kept before a second of any. Above half the tokens the rule
applies to what is dropped. PAR's router (`methods/par/router.py`) and the `stratified-random`
baseline (random scores under the same rule) share it.
"""

from __future__ import annotations

import functools
import math

import torch


def tiles(n: int, grid, k: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``([n] tile id, tile grid)`` of n visual tokens for a budget of k: the (rows, cols) `grid` cut into
    near-square h x w rectangles (w = h or h + 1) in row-major order, or the sequence into runs of r
    tokens when there is no grid, choosing the shape whose number of tiles is closest to k (ties:
    fewer tiles); tiles hold two tokens or more whenever k < n. The tile grid is (rows, cols) of the
    tiles themselves (None for runs)."""
    index = torch.arange(n)
    k = max(1, min(n, int(k)))
    if grid is not None and grid[0] * grid[1] == n:
        rows, cols = int(grid[0]), int(grid[1])
        high, wide = _tile_shape(rows, cols, k)
        across = math.ceil(cols / wide)
        return (index // cols) // high * across + (index % cols) // wide, (math.ceil(rows / high), across)
    (run,) = _closest(k, tuple((math.ceil(n / r), r) for r in range(2 if k < n else 1, n + 1)))
    return index // run, None


@functools.lru_cache(maxsize=4096)
def _tile_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """(h, w) of `tiles` for a rows x cols grid and a budget of k tokens."""
    least = 2 if k < rows * cols else 1
    return _closest(k, tuple(
        (math.ceil(rows / h) * math.ceil(cols / w), h, w) for h in range(1, rows + 1) for w in (h, h + 1) if h * w >= least
    ))


def _closest(k: int, shapes) -> tuple:
    """The shape of ``(tile count, *shape)`` candidates whose count is closest to k (ties: fewer tiles)."""
    return min((abs(count - k), count, shape) for count, *shape in shapes)[2]


def balanced_row(logits: torch.Tensor, grid, k: int) -> torch.Tensor:
    """``[n]`` scores whose top-k takes the best token of every tile (`tiles`) before a second of any.
    Where there are more tiles than k, the tiles that get one are themselves chosen tile-balanced
    (recursively, over the tile grid, by each tile's best logit); second and later rounds go by logit.
    Above half the tokens the rule is applied to what is dropped: the n - k dropped tokens are the
    worst token of every tile for a budget of n - k, so drops are spread over the image too."""
    n = logits.shape[0]
    if n < 2 * k < 2 * n:
        return -balanced_row(-logits, grid, n - k)
    tile, tile_grid = tiles(n, grid, k)
    tile = tile.to(logits.device)
    # sort by tile, then by logit (descending) inside a tile: rank = place within the tile
    order = torch.argsort(logits, descending=True, stable=True)
    order = order[torch.argsort(tile[order], stable=True)]
    counts = torch.bincount(tile)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, device=logits.device)
    rank[order] = (torch.arange(n, device=logits.device) - starts[tile[order]]).to(rank.dtype)
    within = torch.sigmoid(logits.float()).to(rank.dtype)
    m = counts.numel()
    if k < m:  # not every tile gets a token: choose which, spread over the tile grid
        best = torch.full((m,), float("-inf"), device=logits.device, dtype=logits.dtype).scatter_reduce(0, tile, logits, "amax")
        tile_order = torch.argsort(balanced_row(best, tile_grid, k), descending=True, stable=True)
        place = torch.empty(m, device=logits.device, dtype=rank.dtype)
        place[tile_order] = torch.arange(m, device=logits.device, dtype=rank.dtype)
        within = torch.where(rank == 0, 1 - place[tile] / m, within)
    return -rank + 0.5 * within


def balanced_scores(logits: torch.Tensor, n_visual: list[int], grids, keep: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` scores whose top-``keep[b]`` is sample b's tile-balanced selection (`balanced_row`);
    -inf past a sample's count."""
    out = torch.full_like(logits, float("-inf"))
    for b, n in enumerate(n_visual):
        if n:
            out[b, :n] = balanced_row(logits[b, :n].detach(), None if grids is None else grids[b], int(keep[b])).to(out.dtype)
    return out
