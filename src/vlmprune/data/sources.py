"""Where examples come from: a JSONL file, a folder of images with one prompt, a Hugging Face
`datasets` dataset (local files or a hub name), or ``testbed`` (FashionScenes). `read_examples` picks
the reader from the source text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import VlmpruneError
from .examples import Example, row_error
from .images import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HF_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_jsonl(path: str | Path, image_key: str = "image", prompt_key: str = "prompt", answer_key: str = "answer") -> list[Example]:
    """Rows ``{"image": PATH, "prompt": TEXT, "answer": TEXT (optional)}``; image paths are relative to
    the file (absolute paths work too); a row without ``image`` is text only. Blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VlmpruneError(f"cannot read {path}: {err}") from err
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        origin = f"{path} row {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise row_error(origin, f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise row_error(origin, f"expected a JSON object, got {type(row).__name__}")
        examples.append(_example(row, origin, path.parent, image_key, prompt_key, answer_key))
    if not examples:
        raise VlmpruneError(f"{path} has no rows; write one JSON object per line")
    return examples


def _example(row: dict, origin: str, base: Path | None, image_key: str, prompt_key: str, answer_key: str) -> Example:
    prompt = row.get(prompt_key)
    if not isinstance(prompt, str) or not prompt.strip():
        raise row_error(origin, f"no {prompt_key!r} text; every row needs a non-empty prompt")
    answer = row.get(answer_key)
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    image = row.get(image_key)
    if isinstance(image, str):
        file = Path(image).expanduser()
        image = read_image(file if file.is_absolute() or base is None else base / file, origin)
    elif isinstance(image, dict) and ("bytes" in image or "path" in image):  # a datasets Image column, undecoded
        image = _decode(image, origin)
    elif image is not None and not hasattr(image, "mode"):
        raise row_error(origin, f"{image_key!r} must be an image path, got {type(image).__name__}")
    return Example(image, prompt, answer, origin)


def _decode(cell: dict, origin: str) -> Any:
    import io

    from PIL import Image

    if cell.get("bytes"):
        try:
            with Image.open(io.BytesIO(cell["bytes"])) as img:
                img.load()
                return img.copy()
        except OSError as err:
            raise row_error(origin, f"cannot decode the image: {err}") from err
    return read_image(cell["path"], origin)


def read_folder(path: str | Path, prompt: str | None) -> list[Example]:
    """Every image file of a folder (sorted by name), each with the same `prompt` and no answer."""
    path = Path(path)
    if not prompt or not prompt.strip():
        raise VlmpruneError(f"{path} is a folder of images: give the question to ask about each with --prompt \"...\"")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlmpruneError(f"{path} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [Example(read_image(f, f"{path} image {f.name}"), prompt, None, f"{path} image {f.name}") for f in files]


def read_hf(source: str, image_column: str = "image", prompt_column: str = "prompt", answer_column: str = "answer",
            split: str = "train", data_files: Any = None) -> list[Example]:
    """A Hugging Face `datasets` dataset: ``json`` / ``parquet`` / ``csv`` / ``imagefolder`` with
    `data_files`, or a hub name (needs internet). Needs ``pip install -e ".[data]"``."""
    try:
        import datasets
    except ImportError:
        raise VlmpruneError('reading Hugging Face datasets needs the `datasets` package: pip install -e ".[data]"') from None
    try:
        ds = datasets.load_dataset(source, data_files=data_files, split=split)
    except Exception as err:  # datasets raises many kinds; one line names the source
        raise VlmpruneError(f"cannot load the dataset {source!r} (split {split!r}): {str(err).splitlines()[0]}") from err
    missing = [c for c in (prompt_column,) if c not in ds.column_names]
    if missing:
        raise VlmpruneError(f"the dataset {source!r} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                            "name it with --prompt-column")
    if image_column in ds.column_names and isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    base = None
    if isinstance(data_files, str) and Path(data_files).is_file():
        base = Path(data_files).parent
    label = data_files if isinstance(data_files, str) else source
    if not len(ds):
        raise VlmpruneError(f"the dataset {label!r} has no rows")
    return [_example(dict(row), f"{label} row {i + 1}", base, image_column, prompt_column, answer_column) for i, row in enumerate(ds)]


def read_examples(source: str | Path, prompt: str | None = None, image_column: str = "image", prompt_column: str = "prompt",
                  answer_column: str = "answer", split: str = "train") -> list[Example]:
    """Examples from `source`:

    * ``*.jsonl`` (or ``*.json`` lines): `read_jsonl`;
    * a folder of images, with `prompt`: `read_folder`; a folder holding ``data.jsonl``: that file;
    * ``*.parquet`` / ``*.csv``, or ``hf:NAME`` (a hub dataset, or ``hf:imagefolder:DIR``): `read_hf`
      with the column names;
    * ``testbed``: the shipped FashionScenes evaluation set.
    """
    text = str(source)
    if text == "testbed":
        return scene_examples()
    if text.startswith("hf:"):
        name = text[3:]
        if name.startswith("imagefolder:"):
            return read_hf("imagefolder", image_column, prompt_column, answer_column, split, data_files={split: name[12:] + "/**"})
        return read_hf(name, image_column, prompt_column, answer_column, split)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "data.jsonl").is_file() and prompt is None:
            return read_jsonl(path / "data.jsonl", image_column, prompt_column, answer_column)
        return read_folder(path, prompt)
    if not path.is_file():
        raise VlmpruneError(f"--data {text!r} is neither a file, a folder, 'testbed' nor 'hf:NAME'")
    if path.suffix.lower() in (".parquet", ".csv"):
        return read_hf(HF_FORMATS[path.suffix.lower()], image_column, prompt_column, answer_column, "train", data_files=str(path))
    return read_jsonl(path, image_column, prompt_column, answer_column)


def scene_examples(split: str = "eval", n: int | None = None, seed: int = 0) -> list[Example]:
    """FashionScenes as examples: the shipped evaluation set (``split="eval"``, the first `n`), or `n`
    generated scenes of the ``"train"`` split (needs Fashion-MNIST)."""
    from PIL import Image

    from ..testbed import data, eval_set

    samples = eval_set(n) if split == "eval" else data.generate(n, split, seed=seed)
    name = "testbed" if split == "eval" else f"testbed {split} scenes"
    return [Example(Image.fromarray(s.image, mode="L"), s.question, s.answer, f"{name} row {i + 1}") for i, s in enumerate(samples)]


def read_texts(source: str | Path) -> list[str]:
    """Text for a text-only LM: JSONL rows ``{"text": ...}`` or a plain text file (one text)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise VlmpruneError(f"--data {str(source)!r} is not a file; a text-only model reads JSONL {{\"text\": ...}} or a text file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8", errors="strict")
        if not text.strip():
            raise VlmpruneError(f"{path} is empty")
        return [text]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise row_error(f"{path} row {number}", f"invalid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise row_error(f"{path} row {number}", "no 'text'; a text-only model reads rows {\"text\": ...}")
        texts.append(row["text"])
    if not texts:
        raise VlmpruneError(f"{path} has no rows")
    return texts
