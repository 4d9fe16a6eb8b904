"""`data.calibration`: the one builder of seeded training scenes gives what the call sites built by hand
before (generate + encode_batches with the old literal seeds), so calibration inputs are unchanged."""

import pytest
import torch

import vlmprune
from vlmprune.data.calibration import CALIBRATION_SEED, scene_batches, training_scenes
from vlmprune.decisions import calibration_inputs
from vlmprune.testbed import data
from vlmprune.testbed.encode import encode_batches

pytestmark = pytest.mark.skipif(not data.DEFAULT_ROOT.is_dir(), reason="needs the Debian package dataset-fashion-mnist")


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _scenes(samples) -> list:
    return [(s.question, s.answer, tuple(s.cells), s.image.tobytes()) for s in samples]


def test_training_scenes_are_the_seeded_training_split():
    assert _scenes(training_scenes(5, 3)) == _scenes(data.generate(5, "train", seed=3))
    assert _scenes(training_scenes(5, 3)) != _scenes(training_scenes(5, 4))


def test_method_calibration_keeps_its_scenes():
    pm = vlmprune.load("testbed")
    tokenizer = pm.processor.tokenizer
    assert CALIBRATION_SEED == 12345
    reference = encode_batches(data.generate(20, "train", seed=12345), tokenizer)  # what generate / sweep built
    assert _same(scene_batches(tokenizer, 20, seed=CALIBRATION_SEED), reference)
    assert _same(calibration_inputs(pm, 20), reference)
    assert not _same(scene_batches(tokenizer, 20, seed=0), reference)
