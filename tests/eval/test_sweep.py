"""`sweep` / `vlmprune sweep` on a random-weight testbed checkpoint: the files, the table against
results.json, FLOPs against the budgets, resuming (interrupted runs and interrupted writes), errors."""

import json
from pathlib import Path

import pytest

import vlmprune
from vlmprune.cli import main
from vlmprune.eval import sweep as sweep_mod
from vlmprune.eval.sweep import FULL, sweep
from vlmprune.testbed import data, eval_set
from vlmprune.testbed.recipe import random_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(limit=16, progress=False, latency_repeats=1, decode_tokens=2)
SMALL = dict(FAST, limit=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("sweep") / "model", words=data.vocabulary())


@pytest.fixture(scope="module")
def pm(checkpoint):
    return vlmprune.load(checkpoint)


@pytest.fixture
def calls(monkeypatch):
    """Counts `evaluate` calls; ``calls.fail_at = k`` interrupts the k-th call like Ctrl-C."""

    class Counter:
        n = 0
        fail_at = None

    real = sweep_mod.evaluate

    def counted(*args, **kwargs):
        Counter.n += 1
        if Counter.n == Counter.fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "evaluate", counted)
    return Counter


def _table_rows(path: Path) -> list[list[str]]:
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]  # without the header


def test_sweep_writes_results_table_and_plot_then_reuses_points(pm, tmp_path, calls):
    res = sweep(pm, "fastv,random-layers", [0.5, 0.25], tmp_path, **FAST)
    assert calls.n == 5 and res.computed == 5 and res.reused == 0
    stored = json.loads((tmp_path / "results.json").read_text())["points"]
    assert [(p["method"], p["keep"]) for p in stored] == [
        (FULL, 1.0), ("fastv", 0.5), ("fastv", 0.25), ("random-layers", 0.5), ("random-layers", 0.25)]
    full, *rest = stored
    assert full["flops_share"] == 1.0 and full["layers_run"] == 8 and full["visual_tokens_kept"] == 144
    for p in stored:
        assert p["n"] == 16 and p["limit"] == 16 and set(p["per_type"]) <= set(data.QUESTION_TYPES)
        assert p["latency"]["prefill_ms"] > 0 and p["latency"]["kv_bytes_decoded"] > p["latency"]["kv_bytes_prefill"] > 0
        assert p["flops_share"] == pytest.approx(p["lm_tflops"] / full["lm_tflops"])
    by = {(p["method"], p["keep"]): p for p in rest}
    for method in ("fastv", "random-layers"):  # FLOPs fall with the budget, below the full model's
        assert full["lm_tflops"] > by[method, 0.5]["lm_tflops"] > by[method, 0.25]["lm_tflops"]
    assert by["fastv", 0.25]["visual_tokens_kept"] == 36 and by["fastv", 0.25]["config"] == {"layer": 2, "keep": 0.25}
    assert by["random-layers", 0.5]["config"]["keep_layers"] == 4 == by["random-layers", 0.5]["layers_run"]
    assert by["random-layers", 0.25]["config"]["keep_layers"] == 2
    assert by["random-layers", 0.5]["options"] == {"seed": 0}

    rows = _table_rows(res.table_md)
    assert len(rows) == len(stored)
    for row, p in zip(rows, stored):
        assert row[0] == p["method"] and float(row[1]) == p["keep"]
        assert row[2] == f"{p['accuracy'] * 100:.1f}%"
        assert float(row[-3]) == pytest.approx(p["lm_tflops"], rel=1e-3)
        assert float(row[-2]) == pytest.approx(p["flops_share"], abs=1e-3)
        assert float(row[-1]) == pytest.approx(p["latency"]["prefill_ms"], abs=0.06)
    assert res.pareto_png.read_bytes()[:8] == PNG_SIGNATURE and res.pareto_png.stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp"))

    before = (tmp_path / "results.json").read_text()
    again = sweep(pm, "fastv,random-layers", [0.5, 0.25], tmp_path, **FAST)
    assert calls.n == 5 and again.computed == 0 and again.reused == 5
    assert (tmp_path / "results.json").read_text() == before and again.points == stored

    more = sweep(pm, "fastv,random-layers", [0.5, 0.25, 0.11], tmp_path, **FAST)  # only the new budget runs
    assert calls.n == 7 and more.computed == 2 and more.reused == 5
    assert [p["config"]["keep_layers"] for p in more.points if p["method"] == "random-layers"] == [4, 2, 1]


def test_interrupted_sweep_resumes_where_it_stopped(pm, tmp_path, calls):
    calls.fail_at = 3
    with pytest.raises(KeyboardInterrupt):
        sweep(pm, "pool", [0.5, 0.25], tmp_path, latency=False, **SMALL)
    stored = json.loads((tmp_path / "results.json").read_text())["points"]
    assert [(p["method"], p["keep"]) for p in stored] == [(FULL, 1.0), ("pool", 0.5)]
    assert not (tmp_path / "table.md").exists()
    calls.n, calls.fail_at = 0, None
    res = sweep(pm, "pool", [0.5, 0.25], tmp_path, latency=False, **SMALL)
    assert calls.n == 1 and res.reused == 2 and res.computed == 1
    assert all(p["latency"] is None for p in res.points)
    assert _table_rows(res.table_md)[0][-1] == ""  # no latency measured: an empty prefill-ms cell

    with_latency = sweep(pm, "pool", [0.5], tmp_path, **SMALL)  # adds only the latency to finished points
    assert calls.n == 1 and with_latency.computed == 2
    assert all(p["latency"]["prefill_ms"] > 0 for p in with_latency.points)


def test_an_interrupted_write_leaves_the_previous_results_whole(pm, tmp_path, calls, monkeypatch):
    sweep(pm, "random", [0.5], tmp_path, latency=False, **SMALL)
    before = (tmp_path / "results.json").read_text()
    real_write = Path.write_text

    def half_write(self, text, *args, **kwargs):  # the process dies halfway through writing
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(KeyboardInterrupt):
        sweep(pm, "random", [0.5, 0.25], tmp_path, latency=False, **SMALL)
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert len(json.loads(before)["points"]) == 2


def test_calibrating_methods_calibrate_once(pm, tmp_path, monkeypatch):
    from vlmprune.methods.layer.shortgpt import ShortGPT

    seen = []
    real = ShortGPT.calibrate
    monkeypatch.setattr(ShortGPT, "calibrate", lambda self, pm, batches: seen.append(1) or real(self, pm, batches))
    res = sweep(pm, "shortgpt", [0.5, 0.25], tmp_path, latency=False, calibration=eval_set(16)[8:], **SMALL)
    assert len(seen) == 1
    points = res.points[1:]
    assert [p["config"]["keep_layers"] for p in points] == [4, 2] and [p["layers_run"] for p in points] == [4, 2]
    assert points[0]["config"]["scores"] == points[1]["config"]["scores"] and len(points[0]["config"]["scores"]) == 8
    assert points[0]["options"]["calib"].startswith("samples:")


def test_bad_arguments_fail_before_any_work(tmp_path, calls):
    with pytest.raises(vlmprune.VlmpruneError, match=r"unknown pruning method 'nosuch'; known methods: .*fastv"):
        sweep("no/such/model", "fastv,nosuch", [0.5], tmp_path)
    with pytest.raises(vlmprune.VlmpruneError, match=r"shares in \(0, 1\]"):
        sweep("no/such/model", "fastv", "0.5,1.5", tmp_path)
    with pytest.raises(vlmprune.VlmpruneError, match="not taken by any"):
        sweep("no/such/model", "fastv", [0.5], tmp_path, options={"stages": 3, "bogus": 1})
    assert calls.n == 0 and not any(tmp_path.iterdir())


def test_cli_sweep(checkpoint, tmp_path, capsys):
    args = ["sweep", "--model", str(checkpoint), "--methods", "pool", "--keep", "0.25", "--out", str(tmp_path),
            "--limit", "8", "--no-latency"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| pool | 0.25 |" in out and "2 point(s) computed, 0 reused" in out
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "table.md", "pareto.png"}
    assert main(args) == 0 and "0 point(s) computed, 2 reused" in capsys.readouterr().out
    assert main(args[:4] + ["pool,nosuch"] + args[5:]) == 2
    assert "vlmprune: error: unknown pruning method 'nosuch'" in capsys.readouterr().err
