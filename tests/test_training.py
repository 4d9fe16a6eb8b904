"""`vlmprune.training.ResumableRun`: a run stopped and resumed ends with the weights, optimizer state and
log of a plain uninterrupted loop (the reference written out here), and a state of another
configuration is refused."""

import json

import pytest
import torch
from torch import nn

from vlmprune.errors import VlmpruneError
from vlmprune.training import STEP_SEED_STRIDE, ResumableRun, load_optimizer_tensors, optimizer_tensors, step_seed

STEPS = 5


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    params = list(model.parameters())
    return model, params, torch.optim.AdamW(params, lr=1e-2)


def _step(model, opt, step: int) -> float:
    g = torch.Generator().manual_seed(step_seed(7, step))
    x = torch.randn(8, 3, generator=g)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _resumable(folder, stop_after=None, config=None):
    model, params, opt = _setup()
    run = ResumableRun(folder, config or {"lr": 1e-2}, {"model": model}, opt, params)
    run.resume()
    for step in run.steps(STEPS, save_every=2, stop_after=stop_after, progress=False):
        run.log.append({"step": step + 1, "loss": _step(model, opt, step)})
    return run, model, opt, params


def test_a_stopped_and_resumed_run_equals_a_plain_loop(tmp_path):
    model, params, opt = _setup()
    log = [{"step": s + 1, "loss": _step(model, opt, s)} for s in range(STEPS)]

    run, _, _, _ = _resumable(tmp_path / "state", stop_after=3)
    assert run.stopped and json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 3
    run, resumed, opt2, params2 = _resumable(tmp_path / "state")
    assert not run.stopped and run.step == 3  # it started from the saved step
    assert run.log == log
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    want, got = optimizer_tensors(opt, params), optimizer_tensors(opt2, params2)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["step"] == STEPS and saved["log"] == log and saved["elapsed"] >= 0


def test_optimizer_tensors_round_trip_into_a_fresh_optimizer():
    model, params, opt = _setup()
    _step(model, opt, 0)
    fresh = torch.optim.AdamW(params, lr=1e-2)
    load_optimizer_tensors(fresh, params, optimizer_tensors(opt, params))
    for p in params:
        assert opt.state[p].keys() == fresh.state[p].keys()
        assert all(torch.equal(opt.state[p][k], fresh.state[p][k]) for k in opt.state[p])
        assert fresh.state[p]["step"].shape == ()


def test_another_configuration_is_refused(tmp_path):
    _resumable(tmp_path / "state", stop_after=2)
    with pytest.raises(VlmpruneError, match="another configuration"):
        _resumable(tmp_path / "state", config={"lr": 2e-2})


def test_step_seed():
    assert step_seed(0, 4) == 4 and step_seed(2, 5) == 2 * STEP_SEED_STRIDE + 5 == 2_000_011
