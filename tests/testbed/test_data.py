"""FashionScenes data: determinism, split separation, brute-force answers, image layout, balance, storage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.testbed import data

NO_DATASET = f"Fashion-MNIST is not installed at {data.DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)"


@pytest.fixture(scope="module")
def train_source():
    if not data.DEFAULT_ROOT.is_dir():
        pytest.skip(NO_DATASET)
    return data.load_fashion_mnist("train")


@pytest.fixture(scope="module")
def test_source():
    if not data.DEFAULT_ROOT.is_dir():
        pytest.skip(NO_DATASET)
    return data.load_fashion_mnist("test")


@pytest.fixture(scope="module")
def eval_set(test_source):
    return data.generate(2000, "test", seed=0, source=test_source)


def brute_force_answer(question: str, cells: tuple[int, ...]) -> str:
    """Answer a question from the per-cell class ids alone, by parsing its words."""
    words = question.split()
    assert words[-1] == "?"
    names = [data.CLASSES[c] if c >= 0 else None for c in cells]
    if words[:4] == ["what", "is", "in", "the"]:
        name = names[data.CELLS.index(words[4])]
        return "nothing" if name is None else name
    if words[:3] == ["is", "there", "a"]:
        return "yes" if words[3] in names else "no"
    if words[:2] == ["how", "many"]:
        return ["zero", "one", "two", "three", "four"][names.count(words[2])]
    if words[:3] == ["where", "is", "the"]:
        where = [i for i, n in enumerate(names) if n == words[3]]
        assert len(where) == 1, f"'where' asked of a class seen {len(where)} times: {question} {cells}"
        return data.CELLS[where[0]]
    raise AssertionError(f"unparsed question {question!r}")


def test_fashion_mnist_parses(train_source, test_source):
    for (images, labels), n in ((train_source, 60000), (test_source, 10000)):
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is exactly balanced
        assert images.reshape(n, -1).max(1).min() > 0  # no item is all black, so empty cells are unambiguous


def test_same_seed_same_samples_other_seed_differs(test_source):
    a = data.generate(50, "test", seed=3, source=test_source)
    b = data.generate(50, "test", seed=3, source=test_source)
    c = data.generate(50, "test", seed=4, source=test_source)
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.question, s.answer, s.cells, s.item_ids) for s in a] == [(s.question, s.answer, s.cells, s.item_ids) for s in b]
    assert a == b
    assert [s.question for s in a] != [s.question for s in c]
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]


def test_splits_never_share_an_image(train_source, test_source):
    train_hashes = {img.tobytes() for img in train_source[0]}
    test_hashes = {img.tobytes() for img in test_source[0]}
    for split, (images, labels), other in (
        ("test", test_source, train_hashes), ("train", train_source, test_hashes),
    ):
        for s in data.generate(300, split, seed=1, source=(images, labels)):
            for i, (cls, item) in enumerate(zip(s.cells, s.item_ids)):
                r, c = divmod(i, 3)
                cell = s.image[28 * r:28 * r + 28, 28 * c:28 * c + 28]
                if cls == -1:
                    assert item == -1
                    continue
                assert 0 <= item < len(images) and labels[item] == cls
                assert np.array_equal(cell, images[item])
                assert cell.tobytes() not in other, f"a {split} scene holds an image of the other split"


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_brute_force(split, train_source, test_source):
    source = train_source if split == "train" else test_source
    samples = data.generate(400, split, seed=7, source=source)
    assert {s.qtype for s in samples} == set(data.QUESTION_TYPES)
    for s in samples:
        assert s.answer == brute_force_answer(s.question, s.cells), (s.question, s.cells)
        assert s.answer in data.ANSWERS[s.qtype]
        assert set(data.prompt(s.question).split()) <= set(data.vocabulary())
        assert s.answer in data.vocabulary()


def test_image_layout(test_source):
    images, _ = test_source
    for s in data.generate(200, "test", seed=2, source=test_source):
        assert s.image.shape == (84, 84) and s.image.dtype == np.uint8
        expected = np.zeros((84, 84), np.uint8)
        for i, item in enumerate(s.item_ids):
            if item >= 0:
                r, c = divmod(i, 3)
                expected[28 * r:28 * r + 28, 28 * c:28 * c + 28] = images[item]
        assert np.array_equal(s.image, expected)
        assert not s.image.flags.writeable


def test_balance_and_chance_accuracy(eval_set):
    types = Counter(s.qtype for s in eval_set)
    assert set(types) == set(data.QUESTION_TYPES)
    for q, n in types.items():
        assert 0.21 <= n / len(eval_set) <= 0.29, (q, n)
    chance = data.chance_accuracy(eval_set)
    assert chance["cell"] <= 0.2 and chance["exists"] <= 0.6 and chance["count"] <= 0.35 and chance["where"] <= 0.2
    dist = data.answer_distribution(eval_set)
    for q in data.QUESTION_TYPES:  # every answer of every type occurs
        assert set(dist[q]) == set(data.ANSWERS[q])
        assert chance[q] == max(dist[q].values()) / types[q]
    # Scenes stay busy: about 6 of 9 cells hold an item on average.
    assert 5.0 < np.mean([sum(c >= 0 for c in s.cells) for s in eval_set]) < 7.5


def test_chance_accuracy_is_majority_baseline():
    img = np.zeros((84, 84), np.uint8)
    cells = (-1,) * 9
    samples = [data.Sample(img, "is there a bag ?", a, "exists", cells, cells) for a in ("yes", "yes", "no")]
    assert data.answer_distribution(samples) == {"exists": {"yes": 2, "no": 1}}
    assert data.chance_accuracy(samples) == {"exists": pytest.approx(2 / 3)}


def test_save_load_round_trip(eval_set, tmp_path):
    path = tmp_path / "sub" / "eval.npz"
    data.save_set(eval_set[:300], path)
    assert [p.name for p in path.parent.iterdir()] == ["eval.npz"]  # no temporary left behind
    loaded = data.load_set(path)
    assert loaded == eval_set[:300]
    with np.load(path, allow_pickle=False) as z:
        assert z["images"].shape == (300, 84, 84) and z["images"].dtype == np.uint8
        assert z["questions"].dtype.kind == "U" and z["answers"].dtype.kind == "U" and z["qtypes"].dtype.kind == "U"
        assert z["cells"].dtype == np.int8 and z["item_ids"].dtype == np.int32
    data.save_set(eval_set[:5], path)  # overwrites in place
    assert data.load_set(path) == eval_set[:5]


def test_missing_dataset_says_how_to_install(tmp_path):
    for root in (tmp_path / "absent", tmp_path):  # no folder, and a folder without the files
        with pytest.raises(VlmpruneError, match="apt-get install dataset-fashion-mnist"):
            data.load_fashion_mnist("test", root=root)
    with pytest.raises(VlmpruneError, match="split"):
        data.load_fashion_mnist("validation", root=tmp_path)


def test_load_set_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(VlmpruneError, match="no FashionScenes set"):
        data.load_set(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(VlmpruneError, match="not a FashionScenes set"):
        data.load_set(tmp_path / "other.npz")
