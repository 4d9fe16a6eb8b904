"""The resumable training loop that both trainers use (`testbed.train`, `methods.par.train`).

    run = ResumableRun(out / "state", asdict(cfg), {"model": model}, opt, params)
    run.resume()                                   # from the saved state, if there is one
    for step in run.steps(cfg.steps, cfg.save_every, stop_after, desc="train"):
        ...                                        # one optimizer step; run.log.append(...) when logging
    if run.stopped:
        return None                                # stopped after `stop_after` steps, state saved

The state folder holds each module's weights (``<name>.safetensors``), the optimizer's tensors
(``optimizer.safetensors``) and ``state.json`` (the run's configuration, the step reached, the log and
the seconds trained); it is written atomically (`files.write_dir`), so an interrupted run resumes from
its last save point and then matches an uninterrupted one. The data of step s under seed k comes from
`step_seed` (k * `STEP_SEED_STRIDE` + s), so a resumed run also draws the same data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import VlmpruneError
from .files import write_dir

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
STEP_SEED_STRIDE = 1_000_003  # a prime: the seeds of one run's steps never meet those of a neighbouring seed's


def step_seed(seed: int, step: int) -> int:
    """The seed of training step `step` of a run seeded with `seed`: ``seed * STEP_SEED_STRIDE + step``."""
    return seed * STEP_SEED_STRIDE + step


def optimizer_tensors(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as named tensors (``"<parameter index>.<key>"``), for safetensors."""
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            out[f"{i}.{key}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value.detach().clone()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what `optimizer_tensors` saved into `opt`'s state for the same `params`."""
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        p = params[int(i)]
        opt.state[p][key] = value.reshape(()) if key == "step" else value.reshape(p.shape)  # safetensors stores 0-d as [1]


class ResumableRun:
    """A training run that saves its state under `folder` and resumes from it (see the module docstring).

    `config`: the run's configuration as JSON data; a saved state of another configuration is refused.
    `modules`: the trained modules by file name; `optimizer` and `params`: the optimizer and the
    parameter list it was built on (its tensors are saved by position in that list)."""

    def __init__(self, folder: str | Path, config: dict, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                 params: Sequence[nn.Parameter]) -> None:
        self.folder, self.config = Path(folder), config
        self.modules, self.optimizer, self.params = dict(modules), optimizer, list(params)
        self.step, self.log, self.elapsed = 0, [], 0.0
        self.stopped = False
        self.bar = None  # the progress bar while `steps` runs
        self._started: float | None = None

    def resume(self) -> bool:
        """Load the saved state, if there is one (weights, optimizer, step, log, seconds); whether it did."""
        if not (self.folder / STATE).is_file():
            return False
        state = json.loads((self.folder / STATE).read_text())
        if state["config"] != self.config:
            raise VlmpruneError(f"{self.folder} holds a run with another configuration; use another --out or delete it")
        for name, module in self.modules.items():
            module.load_state_dict(load_file(self.folder / f"{name}.safetensors"))
        load_optimizer_tensors(self.optimizer, self.params, load_file(self.folder / OPTIMIZER))
        self.step, self.log, self.elapsed = state["step"], state["log"], state["elapsed"]
        return True

    def seconds(self) -> float:
        """Seconds trained so far, this session included."""
        return self.elapsed + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def save(self, step: int) -> None:
        """Write the state reached after `step` steps (atomically)."""
        def write(tmp: Path) -> None:
            for name, module in self.modules.items():
                save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
            save_file(optimizer_tensors(self.optimizer, self.params), tmp / OPTIMIZER)
            (tmp / STATE).write_text(json.dumps(dict(config=self.config, step=step, log=self.log, elapsed=self.seconds())))

        write_dir(self.folder, write)

    def steps(self, total: int, save_every: int, stop_after: int | None = None, progress: bool = True,
              desc: str = "train") -> Iterator[int]:
        """The steps still to run, from the one reached to `total`; while they are consumed the bar is
        `self.bar`. After a step's body, the state is saved every `save_every` steps, at the last step
        and at `stop_after` (steps in total), where the loop ends with `self.stopped` set."""
        self._started = time.perf_counter()
        self.bar = tqdm(range(self.step, total), initial=self.step, total=total, desc=desc, disable=not progress)
        for step in self.bar:
            yield step
            done = step + 1
            if done % save_every == 0 or done == total or done == stop_after:
                self.save(done)
            if done == stop_after:
                self.stopped = True
                break
        self.bar.close()
        self.elapsed = self.seconds()
        self._started = None
