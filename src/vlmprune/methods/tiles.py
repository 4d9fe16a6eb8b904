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
    return balanced_rows(logits[None], grid, k)[0]


def balanced_rows(logits: torch.Tensor, grid, k: int) -> torch.Tensor:
    """`balanced_row` of every row of ``logits [G, n]`` at once (rows sharing n, `grid` and k)."""
    rows, n = logits.shape
    if n < 2 * k < 2 * n:
        return -balanced_rows(-logits, grid, n - k)
    device = logits.device
    tile, tile_grid = tiles(n, grid, k)
    tile = tile.to(device)
    # sort by tile, then by logit (descending) inside a tile: rank = place within the tile
    order = torch.argsort(logits, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(tile[order], dim=1, stable=True))
    counts = torch.bincount(tile)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(rows, n, device=device)
    rank.scatter_(1, order, (torch.arange(n, device=device) - starts[tile[order]]).to(rank.dtype))
    within = torch.sigmoid(logits.float()).to(rank.dtype)
    m = counts.numel()
    if k < m:  # not every tile gets a token: choose which, spread over the tile grid
        best = torch.full((rows, m), float("-inf"), device=device, dtype=logits.dtype)
        best = best.scatter_reduce(1, tile.expand(rows, n), logits, "amax")
        tile_order = torch.argsort(balanced_rows(best, tile_grid, k), dim=1, descending=True, stable=True)
        place = torch.empty(rows, m, device=device, dtype=rank.dtype)
        place.scatter_(1, tile_order, torch.arange(m, device=device, dtype=rank.dtype).expand(rows, m))
        within = torch.where(rank == 0, 1 - place[:, tile] / m, within)
    return -rank + 0.5 * within


def balanced_scores(logits: torch.Tensor, n_visual: list[int], grids, keep: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` scores whose top-``keep[b]`` is sample b's tile-balanced selection (`balanced_row`);
    -inf past a sample's count. Samples with the same count, grid and budget are scored together."""
    out = torch.full_like(logits, float("-inf"))
    groups: dict[tuple, list[int]] = {}
    for b, n in enumerate(n_visual):
        if n:
            grid = None if grids is None or grids[b] is None else tuple(int(g) for g in grids[b])
            groups.setdefault((n, grid, int(keep[b])), []).append(b)
    for (n, grid, k), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        out[index, :n] = balanced_rows(logits[index, :n].detach(), grid, k).to(out.dtype)
    return out
