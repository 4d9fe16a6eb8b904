"""A trained router on disk: ``router.safetensors`` (weights) and ``router.json`` (its `RouterConfig`
and how it was trained). Written atomically; read with safetensors only (nothing is unpickled)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import VlmpruneError
from ...files import write_json
from .router import Router, RouterConfig

WEIGHTS, CONFIG = "router.safetensors", "router.json"


def save_router(router: Router, out_dir, info: dict | None = None) -> Path:
    """Write the router's weights and config (plus `info`, e.g. the training settings and log) into
    `out_dir`; each file goes to a temporary name first and is renamed into place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    write_json(out / CONFIG, {"config": router.config.to_dict(), **(info or {})})
    return out


def router_path(path) -> Path:
    """A router directory; ``"testbed"`` is the router shipped for the embedded testbed model."""
    if str(path) == "testbed":
        from ...testbed import ASSETS

        return ASSETS / "router"
    return Path(path)


def _check_files(folder: Path) -> Path:
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise VlmpruneError(f"{folder} is not a PAR router: it needs {CONFIG} and {WEIGHTS} (train one with `vlmprune router train`)")
    return folder


def read_info(path) -> dict:
    """``router.json`` of a saved router (config and training information)."""
    folder = _check_files(router_path(path))
    try:
        return json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VlmpruneError(f"{folder / CONFIG} is corrupt ({err}); retrain the router or restore the file") from None


def load_router(path) -> Router:
    """The router saved in `path` (a directory or ``"testbed"``; cached per directory and file modification times), in eval mode."""
    folder = _check_files(router_path(path).resolve())  # (read and checked once per stamp, in `_load`)
    stamps = tuple((folder / name).stat().st_mtime_ns for name in (CONFIG, WEIGHTS))
    return _load(str(folder), stamps)


@functools.lru_cache(maxsize=8)
def _load(folder: str, stamps: tuple) -> Router:
    info = read_info(folder)
    try:
        config = RouterConfig(**info["config"])
    except (KeyError, TypeError) as err:
        raise VlmpruneError(f"{Path(folder) / CONFIG} has no valid router config ({err}); retrain the router") from None
    router = Router(config)
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise VlmpruneError(f"{Path(folder) / WEIGHTS} is corrupt ({err}); retrain the router or restore the file") from None
    mine = router.state_dict()
    if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
        raise VlmpruneError(f"{Path(folder) / WEIGHTS} does not match its {CONFIG} (other tensors or shapes); the checkpoint is corrupt")
    router.load_state_dict(state)
    return router.eval().requires_grad_(False)
