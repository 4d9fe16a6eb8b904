"""FashionScenes: a small visual question answering task built from real Fashion-MNIST images.

A scene is a 3x3 grid of 28x28 cells, one 84x84 grayscale ``uint8`` image. Each cell is empty (black)
with probability ``EMPTY_P`` or holds one Fashion-MNIST item. Four question types, each answered by one
lowercase word::

    cell    "what is in the center ?"   -> a class name or "nothing"
    exists  "is there a bag ?"          -> "yes" / "no"
    count   "how many sneaker ?"        -> "zero" .. "four"
    where   "where is the coat ?"       -> a cell name (asked only of a class that appears exactly once)

Questions are built so that a blind guess scores low: the question type is uniform over the four, and
the answer is drawn first, uniformly over that type's answers, before the scene is edited to make it
true (the asked cell is set to the drawn class; exactly k cells are set to the counted class and every
other occurrence of it is swapped for another class; ...). `chance_accuracy` reports the majority-answer
baseline of a set.

Source and licence: the images are Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017,
https://github.com/zalandoresearch/fashion-mnist), MIT licence, © 2017 Zalando SE, read from the Debian
package ``dataset-fashion-mnist`` (gzip'd IDX files under ``/usr/share/datasets/fashion-mnist``).
Training scenes draw items only from the train split (60000 images), evaluation scenes only from the
test split (``t10k``, 10000 images), so no evaluation image is ever seen in training.

Example::

    from vlmprune.testbed import data

    samples = data.generate(2000, "test", seed=0)
    data.save_set(samples, "eval.npz")            # one compressed .npz, no pickle
    assert data.load_set("eval.npz")[0] == samples[0]
    print(data.prompt(samples[0].question), samples[0].answer, data.chance_accuracy(samples))
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ..errors import VlmpruneError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Fashion-MNIST label order (0..9), each shortened to one word so that answers are single tokens.
CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)
# Row-major cell order: cell i sits at row i // 3, column i % 3 of the grid.
CELLS: tuple[str, ...] = (
    "top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
)
QUESTION_TYPES: tuple[str, ...] = ("cell", "exists", "count", "where")

NOTHING = "nothing"
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
ITEM_SIZE = 28
GRID = 3
IMAGE_SIZE = GRID * ITEM_SIZE  # 84
EMPTY_P = 0.35  # probability that a cell of the base scene is empty
EMPTY = -1  # class id / item id of an empty cell

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "user : " + IMAGE_TOKEN + " {question} assistant :"
QUESTION_TEMPLATES: Mapping[str, str] = MappingProxyType({
    "cell": "what is in the {cell} ?",
    "exists": "is there a {cls} ?",
    "count": "how many {cls} ?",
    "where": "where is the {cls} ?",
})
# Every answer a question type can have; the generator draws uniformly from these.
ANSWERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cell": CLASSES + (NOTHING,),
    "exists": ("yes", "no"),
    "count": COUNT_WORDS,
    "where": CELLS,
})
ANSWER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w for q in QUESTION_TYPES for w in ANSWERS[q]))

_SPLIT_FILES = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Sample:
    """One FashionScenes question.

    image: the 84x84 ``uint8`` scene (read-only view).
    question: the question, whitespace-separated lowercase words, e.g. ``"how many bag ?"``.
    answer: the one-word answer.
    qtype: one of `QUESTION_TYPES`.
    cells: the class id in each of the 9 cells (row-major, see `CELLS`), -1 where empty.
    item_ids: the index into the source split of each cell's image, -1 where empty.
    """

    image: np.ndarray
    question: str
    answer: str
    qtype: str
    cells: tuple[int, ...]
    item_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.image.shape != (IMAGE_SIZE, IMAGE_SIZE) or self.image.dtype != np.uint8:
            raise VlmpruneError(
                f"a FashionScenes image is {IMAGE_SIZE}x{IMAGE_SIZE} uint8, got {self.image.shape} {self.image.dtype}"
            )
        if self.qtype not in QUESTION_TYPES:
            raise VlmpruneError(f"unknown question type {self.qtype!r}; expected one of {QUESTION_TYPES}")
        if len(self.cells) != len(CELLS) or len(self.item_ids) != len(CELLS):
            raise VlmpruneError(f"cells and item_ids need {len(CELLS)} entries, got {len(self.cells)}, {len(self.item_ids)}")
        view = self.image.view()  # a view, so the caller's array keeps its own flags
        view.flags.writeable = False
        object.__setattr__(self, "image", view)
        object.__setattr__(self, "cells", tuple(int(c) for c in self.cells))
        object.__setattr__(self, "item_ids", tuple(int(i) for i in self.item_ids))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (
            (self.question, self.answer, self.qtype, self.cells, self.item_ids)
            == (other.question, other.answer, other.qtype, other.cells, other.item_ids)
            and np.array_equal(self.image, other.image)
        )

    __hash__ = None  # type: ignore[assignment]  # equal by value, holds a mutable-typed array


def vocabulary() -> list[str]:
    """Every word of the prompt template, the questions and the answers, each once, in a fixed order."""
    words: list[str] = []
    for template in (PROMPT_TEMPLATE, *QUESTION_TEMPLATES.values()):
        words += [w for w in template.split() if not w.startswith("{")]
    words += list(CLASSES) + list(CELLS) + list(ANSWER_WORDS)
    return list(dict.fromkeys(words))


def prompt(question: str) -> str:
    """The model prompt for a question; the image placeholder token is ``<image>``."""
    return PROMPT_TEMPLATE.format(question=question)


def _missing(path: Path) -> VlmpruneError:
    return VlmpruneError(
        f"Fashion-MNIST is needed to regenerate the data or retrain, and {path} is missing; install it with "
        "`apt-get install dataset-fashion-mnist` (the shipped evaluation set does not need it)"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzip'd IDX file: a big-endian magic, `ndim` big-endian int32 sizes, then uint8 data."""
    if not path.is_file():
        raise _missing(path)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise VlmpruneError(f"{path} is not an IDX file of the expected kind (magic {int(header[0]):#010x})")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise VlmpruneError(f"{path} is truncated: header says {shape}, found {data.size} bytes of data")
    return data.reshape(shape)


def load_fashion_mnist(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """One Fashion-MNIST split: images ``uint8 [N, 28, 28]`` and labels ``int64 [N]``.

    split: ``"train"`` (60000 images) or ``"test"`` (the ``t10k`` files, 10000 images).
    root: the folder holding the four ``*-ubyte.gz`` files (the Debian package's by default).
    """
    if split not in _SPLIT_FILES:
        raise VlmpruneError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise _missing(root)
    stem = _SPLIT_FILES[split]
    images = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[1:] != (ITEM_SIZE, ITEM_SIZE) or len(images) != len(labels):
        raise VlmpruneError(f"Fashion-MNIST {split} under {root} has images {images.shape} and labels {labels.shape}")
    return images.copy(), labels  # copy: frombuffer arrays are read-only and pin the whole gzip payload


def compose(cells: Sequence[int], item_ids: Sequence[int], images: np.ndarray) -> np.ndarray:
    """The 84x84 scene for per-cell item ids into `images` [N, 28, 28] (black where the id is -1)."""
    scene = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, item in enumerate(item_ids):
        if item != EMPTY:
            r, c = divmod(i, GRID)
            scene[r * ITEM_SIZE:(r + 1) * ITEM_SIZE, c * ITEM_SIZE:(c + 1) * ITEM_SIZE] = images[item]
    return scene


def _other_class(rng: np.random.Generator, cls: int) -> int:
    """A class drawn uniformly from the nine that are not `cls`."""
    k = int(rng.integers(len(CLASSES) - 1))
    return k if k < cls else k + 1


def _question(rng: np.random.Generator, cells: list[int]) -> tuple[str, str, str]:
    """Draw a question type and its answer, then edit `cells` in place so the answer is true."""
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    n_ans = len(ANSWERS[qtype])
    if qtype == "cell":
        pos = int(rng.integers(len(CELLS)))
        a = int(rng.integers(n_ans))  # 0..9 a class, 10 "nothing"
        cells[pos] = a if a < len(CLASSES) else EMPTY
        return qtype, QUESTION_TEMPLATES["cell"].format(cell=CELLS[pos]), ANSWERS["cell"][a]
    cls = int(rng.integers(len(CLASSES)))
    if qtype == "exists":
        yes = bool(rng.integers(2))
        if yes and cls not in cells:
            cells[int(rng.integers(len(CELLS)))] = cls
        elif not yes:
            cells[:] = [_other_class(rng, cls) if c == cls else c for c in cells]
        return qtype, QUESTION_TEMPLATES["exists"].format(cls=CLASSES[cls]), "yes" if yes else "no"
    if qtype == "count":
        k = int(rng.integers(n_ans))  # 0..4, so the answer never exceeds "four"
        chosen = set(rng.choice(len(CELLS), size=k, replace=False).tolist())
        cells[:] = [cls if i in chosen else (_other_class(rng, cls) if c == cls else c) for i, c in enumerate(cells)]
        return qtype, QUESTION_TEMPLATES["count"].format(cls=CLASSES[cls]), COUNT_WORDS[k]
    pos = int(rng.integers(n_ans))  # where: the answer cell
    cells[:] = [cls if i == pos else (_other_class(rng, cls) if c == cls else c) for i, c in enumerate(cells)]
    return qtype, QUESTION_TEMPLATES["where"].format(cls=CLASSES[cls]), CELLS[pos]


def generate(
    n: int, split: str, seed: int, source: tuple[np.ndarray, np.ndarray] | None = None
) -> list[Sample]:
    """`n` FashionScenes samples, the same for the same (`n`, `split`, `seed`, source).

    split: ``"train"`` or ``"test"``; items come only from that Fashion-MNIST split.
    seed: seeds a ``numpy.random.Generator``; nothing else is random.
    source: ``(images, labels)`` of that split, as `load_fashion_mnist` returns them; loaded when None.
    """
    if n < 0:
        raise VlmpruneError(f"the number of samples must be >= 0, got {n}")
    images, labels = load_fashion_mnist(split) if source is None else source
    if images.ndim != 3 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE) or len(images) != len(labels):
        raise VlmpruneError(f"source must be images [N, 28, 28] with N labels, got {images.shape} and {labels.shape}")
    by_class = [np.flatnonzero(labels == c) for c in range(len(CLASSES))]
    if any(len(ids) == 0 for ids in by_class):
        raise VlmpruneError("the source split lacks some Fashion-MNIST class; every class needs at least one image")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        # Base scene: each cell empty with probability EMPTY_P, else a uniformly drawn class.
        cells = [EMPTY if rng.random() < EMPTY_P else int(rng.integers(len(CLASSES))) for _ in CELLS]
        qtype, question, answer = _question(rng, cells)
        item_ids = [EMPTY if c == EMPTY else int(by_class[c][rng.integers(len(by_class[c]))]) for c in cells]
        samples.append(Sample(
            image=compose(cells, item_ids, images), question=question, answer=answer, qtype=qtype,
            cells=tuple(cells), item_ids=tuple(item_ids),
        ))
    return samples


def save_set(samples: Sequence[Sample], path: str | Path) -> Path:
    """Write `samples` to one compressed ``.npz`` at `path` (no pickle), atomically.

    The file is written beside `path` under a temporary name, then moved over `path`, so a reader never
    sees half a file. Arrays: ``images uint8 [N,84,84]``, ``questions``/``answers``/``qtypes`` unicode
    ``[N]``, ``cells int8 [N,9]``, ``item_ids int32 [N,9]``, ``format_version int64 []``.
    """
    path = Path(path)
    arrays = {
        "format_version": np.array(_FORMAT_VERSION, dtype=np.int64),
        "images": np.stack([s.image for s in samples]) if samples
        else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
        "questions": np.array([s.question for s in samples], dtype=np.str_),
        "answers": np.array([s.answer for s in samples], dtype=np.str_),
        "qtypes": np.array([s.qtype for s in samples], dtype=np.str_),
        "cells": np.array([s.cells for s in samples], dtype=np.int8).reshape(-1, len(CELLS)),
        "item_ids": np.array([s.item_ids for s in samples], dtype=np.int32).reshape(-1, len(CELLS)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_set(path: str | Path) -> list[Sample]:
    """Read a set written by `save_set` (with ``allow_pickle=False``)."""
    path = Path(path)
    if not path.is_file():
        raise VlmpruneError(f"no FashionScenes set at {path}")
    with np.load(path, allow_pickle=False) as z:
        keys = {"format_version", "images", "questions", "answers", "qtypes", "cells", "item_ids"}
        if not keys <= set(z.files) or int(z["format_version"]) != _FORMAT_VERSION:
            raise VlmpruneError(f"{path} is not a FashionScenes set of format {_FORMAT_VERSION} (has {sorted(z.files)})")
        images, cells, item_ids = z["images"], z["cells"].tolist(), z["item_ids"].tolist()
        questions, answers, qtypes = z["questions"].tolist(), z["answers"].tolist(), z["qtypes"].tolist()
    return [
        Sample(image=images[i], question=questions[i], answer=answers[i], qtype=qtypes[i],
               cells=tuple(cells[i]), item_ids=tuple(item_ids[i]))
        for i in range(len(images))
    ]


def answer_distribution(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """For each question type present, how often each answer occurs (most frequent first)."""
    counts: dict[str, Counter[str]] = {}
    for s in samples:
        counts.setdefault(s.qtype, Counter())[s.answer] += 1
    return {q: dict(counts[q].most_common()) for q in QUESTION_TYPES if q in counts}


def chance_accuracy(samples: Sequence[Sample]) -> dict[str, float]:
    """For each question type present, the accuracy of always giving its most frequent answer."""
    return {q: max(d.values()) / sum(d.values()) for q, d in answer_distribution(samples).items()}
