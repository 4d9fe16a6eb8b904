"""Paired bootstrap: a plain-loop reference with the same generator draws, closed forms, coverage and
narrowing, reproducibility, clear errors; `evaluate`'s per-question correctness."""

import numpy as np
import pytest

import vlmprune
from vlmprune.eval.bootstrap import BootstrapInterval, paired_bootstrap


def _pair(n: int, seed: int = 0, p=(0.7, 0.6)) -> tuple[list[bool], list[bool]]:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < p[0]).tolist(), (rng.random(n) < p[1]).tolist()


def _reference(a, b, resamples, seed, level):
    """Brute force: one resample after another, means by hand, the sorted differences' tail ranks."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n).tolist()
        diffs.append(sum(float(a[i]) for i in idx) / n - sum(float(b[i]) for i in idx) / n)
    diffs.sort()
    tail = round(resamples * (1 - level) / 2 * 1e6) // 10**6  # floor, robust to 0.1 * 1000 = 99.99...
    return sum(map(float, a)) / n - sum(map(float, b)) / n, diffs[tail], diffs[resamples - 1 - tail]


@pytest.mark.parametrize("n, resamples, seed, level", [(40, 1000, 0, 0.95), (7, 333, 5, 0.9), (1, 10, 2, 0.5), (200, 400, 9, 0.8)])
def test_equals_a_plain_loop_with_the_same_draws(n, resamples, seed, level):
    a, b = _pair(n, seed)
    got = paired_bootstrap(a, b, resamples=resamples, seed=seed, level=level)
    diff, low, high = _reference(a, b, resamples, seed, level)
    assert (got.diff, got.low, got.high) == (diff, low, high)
    assert (got.resamples, got.seed, got.level, got.n) == (resamples, seed, level, n)


def test_chunked_draws_equal_one_draw(monkeypatch):
    """Many questions x resamples are drawn in chunks; the chunking changes nothing."""
    import vlmprune.eval.bootstrap as bootstrap

    a, b = _pair(300, 1)
    whole = paired_bootstrap(a, b, resamples=500, seed=3)
    monkeypatch.setattr(bootstrap, "CHUNK", 1000)  # 3 resamples per chunk
    assert paired_bootstrap(a, b, resamples=500, seed=3) == whole


def test_closed_forms():
    a, _ = _pair(50)
    same = paired_bootstrap(a, a, resamples=200)
    assert (same.diff, same.low, same.high, same.excludes_zero) == (0.0, 0.0, 0.0, False)
    right_wrong = paired_bootstrap([True] * 30, [0] * 30, resamples=200)
    assert (right_wrong.diff, right_wrong.low, right_wrong.high, right_wrong.excludes_zero) == (1.0, 1.0, 1.0, True)
    assert paired_bootstrap([0] * 30, [1] * 30).high == -1.0


def test_contains_the_observed_difference_and_narrows_as_n_grows():
    widths = []
    for n in (50, 400, 3200):
        a, b = _pair(n, seed=4)
        ci = paired_bootstrap(a, b, resamples=500, seed=1)
        assert ci.low <= ci.diff <= ci.high
        assert ci.diff == pytest.approx(np.mean(a) - np.mean(b))
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(8, rel=0.35)  # ~ 1/sqrt(n)
    big = paired_bootstrap(*_pair(3200, seed=4, p=(0.8, 0.6)), resamples=500)
    assert big.excludes_zero and big.low > 0
    assert not paired_bootstrap(*_pair(100, seed=4, p=(0.6, 0.6))).excludes_zero


def test_seed_reproducibility_and_record():
    a, b = _pair(120, 2)
    one = paired_bootstrap(a, b, resamples=300, seed=11)
    assert paired_bootstrap(a, b, resamples=300, seed=11) == one
    assert {paired_bootstrap(a, b, resamples=300, seed=s).low for s in range(6)} != {one.low}
    assert isinstance(one, BootstrapInterval)
    with pytest.raises(AttributeError):
        one.diff = 0.0  # frozen
    assert one.to_dict() == dict(diff=one.diff, low=one.low, high=one.high, resamples=300, seed=11, level=0.95, n=120,
                                 excludes_zero=one.excludes_zero)
    # bools and 0/1 numbers are the same input
    assert paired_bootstrap([int(x) for x in a], np.array(b, dtype=float), resamples=300, seed=11) == one


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a=[1, 0, 1], b=[1, 0]), "a has 3 answers, b has 2"),
        (dict(a=[], b=[]), "empty"),
        (dict(a=[1, 0], b=[0, 1], resamples=0), "resamples must be an integer >= 1, got 0"),
        (dict(a=[1, 0], b=[0, 1], resamples=2.5), "resamples must be an integer"),
        (dict(a=[1, 0], b=[0, 1], level=1.0), r"level=1.0 is outside \(0, 1\)"),
        (dict(a=[1, 0], b=[0, 1], level=0), r"level=0 is outside \(0, 1\)"),
        (dict(a=[1, 0], b=[0, 1], level=95), r"outside \(0, 1\)"),
        (dict(a=[[1, 0]], b=[[0, 1]]), "one flat sequence"),
        (dict(a=["yes", "no"], b=[0, 1]), "per-question correctness"),
        (dict(a=[1, float("nan")], b=[0, 1]), "non-finite"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    with pytest.raises(vlmprune.VlmpruneError, match=message):
        paired_bootstrap(**kwargs)


def test_evaluate_records_per_question_correctness():
    from vlmprune.eval.vqa import evaluate
    from vlmprune.testbed import ASSETS, eval_set

    if not (ASSETS / "model" / "config.json").is_file():
        pytest.skip("no trained testbed checkpoint is bundled")
    pm = vlmprune.load("testbed")
    samples = eval_set(12)
    result = evaluate(pm, samples, prune=vlmprune.Random(keep=0.1), batch_size=5, progress=False)
    assert len(result.correct) == len(result.predictions) == result.n == 12
    assert result.correct == [p == s.answer for p, s in zip(result.predictions, samples)]
    assert result.accuracy == sum(result.correct) / 12
    for qtype, acc in result.per_type.items():
        mine = [c for c, s in zip(result.correct, samples) if s.qtype == qtype]
        assert acc == sum(mine) / len(mine)
    assert "correct" not in result.to_dict() and "predictions" not in result.to_dict()
    assert result.to_dict(with_correct=True)["correct"] == result.correct
