"""The offline FashionScenes tasks for lmms-eval: the shipped evaluation set, built in memory from the
package's own file (no download), and the functions the task YAMLs name."""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value
from lmms_eval.api.task import ConfigurableTask

from vlmprune.testbed import data as scenes
from vlmprune.testbed import eval_set

OPTIONS = 4  # cell names offered for a "where" question


def _rows(where_only: bool) -> dict[str, list]:
    from PIL import Image as PILImage

    rows: dict[str, list] = {k: [] for k in ("index", "image", "question", "answer", "qtype", "cells")}
    for i, s in enumerate(eval_set()):
        if where_only and s.qtype != "where":
            continue
        rows["index"].append(i)
        rows["image"].append(PILImage.fromarray(s.image, mode="L"))
        rows["question"].append(s.question)
        rows["answer"].append(s.answer)
        rows["qtype"].append(s.qtype)
        rows["cells"].append(list(s.cells))
    return rows


FEATURES = Features(index=Value("int32"), image=Image(), question=Value("string"), answer=Value("string"),
                    qtype=Value("string"), cells=Sequence(Value("int8")))


class FashionScenesTask(ConfigurableTask):
    """A `ConfigurableTask` whose data is the shipped evaluation set (in evaluation order)."""

    WHERE_ONLY = False

    def __init__(self, config: dict | None = None, **kwargs):
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        test = Dataset.from_dict(_rows(self.WHERE_ONLY), features=FEATURES)
        self.dataset = DatasetDict(test=test)
        self.dataset_no_image = DatasetDict(test=test.remove_columns("image"))


class FashionScenesWhereTask(FashionScenesTask):
    WHERE_ONLY = True


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("L")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(first_word(results[0]) == doc["answer"])}


def doc_to_choice(doc: dict) -> list[str]:
    """The answer cell and three other cells drawn with the question's index as the seed, in row-major order."""
    others = [c for c in scenes.CELLS if c != doc["answer"]]
    picked = {doc["answer"], *random.Random(int(doc["index"])).sample(others, OPTIONS - 1)}
    return [c for c in scenes.CELLS if c in picked]


def doc_to_choice_target(doc: dict) -> int:
    return doc_to_choice(doc).index(doc["answer"])
