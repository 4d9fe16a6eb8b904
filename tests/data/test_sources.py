"""The data layer: every source, the chat-template prompt, image conversion and the bad-data lines."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from vlmprune.data import (conform_image, encode_examples, example_batches, read_examples, read_texts, take,
                           scene_examples)
from vlmprune.errors import VlmpruneError
from vlmprune.testbed import eval_set
from vlmprune.testbed.encode import encode


@pytest.fixture(scope="module")
def testbed_pm():
    return vlmprune.load("testbed")


def _photo(path, mode="RGB", size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + (() if mode == "L" else (len(mode),))
    Image.fromarray((rng.random(shape) * 255).astype("uint8"), mode=None).convert(mode).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rows_with_relative_and_absolute_images(tmp_path):
    (tmp_path / "img").mkdir()
    a = _photo(tmp_path / "img" / "a.png")
    b = _photo(tmp_path / "b.jpg", seed=1)
    data = _jsonl(tmp_path / "data.jsonl", [{"image": "img/a.png", "prompt": "what is it?", "answer": "noise"}, "",
                                           {"image": str(b), "prompt": "colour?"}, {"prompt": "text only"}])
    rows = read_examples(data)
    assert [r.prompt for r in rows] == ["what is it?", "colour?", "text only"]
    assert [r.answer for r in rows] == ["noise", None, None]
    assert np.array_equal(np.asarray(rows[0].image), np.asarray(Image.open(a)))
    assert rows[1].image.size == (40, 30) and rows[2].image is None
    assert rows[2].origin == f"{data} row 4"


@pytest.mark.parametrize("row, message", [
    ({"image": "missing.png", "prompt": "q"}, "row 2: image file"),
    ({"image": "broken.png", "prompt": "q"}, "row 2: cannot read image"),
    ({"image": "ok.png"}, "row 2: no 'prompt'"),
    ('{"image": "ok.png", "prompt": ', "row 2: invalid JSON"),
    ('[1, 2]', "row 2: expected a JSON object"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, row, message):
    _photo(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = _jsonl(tmp_path / "data.jsonl", [{"image": "ok.png", "prompt": "fine"}, row])
    with pytest.raises(VlmpruneError, match=str(data).replace("\\", "\\\\") + " " + message.replace("(", r"\(")):
        read_examples(data)


def test_empty_sources_and_too_many_samples(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(VlmpruneError, match="has no rows"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(VlmpruneError, match="no image files"):
        read_examples(tmp_path, prompt="q")
    with pytest.raises(VlmpruneError, match="neither a file"):
        read_examples(tmp_path / "nothing.jsonl")
    rows = [object()] * 3
    assert len(take(rows, 2, "--calib", "x")) == 2
    with pytest.raises(VlmpruneError, match="--calib 5 asks for more samples than x has \\(3\\)"):
        take(rows, 5, "--calib", "x")


def test_folder_of_images_needs_a_prompt(tmp_path):
    for i, name in enumerate(["b.png", "a.jpg", "notes.txt"]):
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            _photo(tmp_path / name, seed=i)
    with pytest.raises(VlmpruneError, match="--prompt"):
        read_examples(tmp_path)
    rows = read_examples(tmp_path, prompt="what is shown?")
    assert [r.origin.split()[-1] for r in rows] == ["a.jpg", "b.png"] and {r.prompt for r in rows} == {"what is shown?"}


def test_hugging_face_json_parquet_and_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    _photo(tmp_path / "a.png")
    _photo(tmp_path / "b.png", seed=1)
    rows = [{"picture": "a.png", "question": "q1", "reply": "r1"}, {"picture": "b.png", "question": "q2", "reply": "r2"}]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    got = read_examples(tmp_path / "d.parquet", image_column="picture", prompt_column="question", answer_column="reply")
    assert [(g.prompt, g.answer) for g in got] == [("q1", "r1"), ("q2", "r2")]
    assert np.array_equal(np.asarray(got[1].image), np.asarray(Image.open(tmp_path / "b.png")))
    with pytest.raises(VlmpruneError, match="no column 'prompt'"):
        read_examples(tmp_path / "d.parquet", image_column="picture")
    folder = tmp_path / "folder"
    folder.mkdir()
    _photo(folder / "x.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "prompt": "what?"}) + "\n")
    got = read_examples(f"hf:imagefolder:{folder}")
    assert got[0].prompt == "what?" and got[0].image.size == (40, 30)


def test_image_conversion_is_lossless_or_announced_or_refused(capsys):
    from vlmprune.data import images

    images._noticed.clear()  # the notice is printed once per process
    grey = Image.fromarray(np.arange(64, dtype="uint8").reshape(8, 8))
    rgb = conform_image(grey, 3)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], np.asarray(grey))
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype="uint8"))
    assert conform_image(colour, 1).mode == "L" and "greyscale" in capsys.readouterr().err
    opaque = colour.convert("RGBA")
    assert np.array_equal(np.asarray(conform_image(opaque, 3)), np.asarray(colour))
    clear = opaque.copy()
    clear.putpixel((0, 0), (0, 0, 0, 0))
    with pytest.raises(VlmpruneError, match="row 9: the image has transparent pixels"):
        conform_image(clear, 3, "row 9")
    with pytest.raises(VlmpruneError, match="mode 'I;16'"):
        conform_image(Image.new("I;16", (4, 4)), 3)


def test_testbed_through_the_chat_template_equals_its_encoder(testbed_pm):
    """The shipped processor's chat template gives FashionScenes' prompt: the generic path equals the
    testbed's own encoder, ids and pixels."""
    examples = scene_examples(n=8)
    got = encode_examples(testbed_pm.processor, examples, channels=1)
    want = encode(eval_set(8), testbed_pm.processor.tokenizer)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # an RGB photograph for the 1-channel tower: converted (with a notice), one batch per 3 rows
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype="uint8"))
    rows = [examples[0].__class__(photo, "how many bag ?", None, "x row 1")] * 5
    batches = example_batches(testbed_pm.processor, rows, 3, channels=1)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2] and batches[0]["pixel_values"].shape[1:] == (1, 84, 84)


def test_prompt_without_template_or_placeholder_is_refused(testbed_pm, tmp_path):
    from vlmprune.data import Example

    proc = testbed_pm.processor
    saved, proc.chat_template = proc.chat_template, None
    try:
        with pytest.raises(VlmpruneError, match="r 1: the checkpoint's processor has no chat template"):
            encode_examples(proc, [Example(None, "hello", None, "r 1")])
        # a finished prompt with the placeholder is taken verbatim
        img = Image.new("L", (84, 84))
        out = encode_examples(proc, [Example(img, "user : <image> how many bag ? assistant :", None, "r 2")], channels=1)
        assert out["input_ids"].shape[1] == 152
    finally:
        proc.chat_template = saved


def test_texts_for_text_only_models(tmp_path):
    (tmp_path / "t.txt").write_text("some text\nmore")
    assert read_texts(tmp_path / "t.txt") == ["some text\nmore"]
    _jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    assert read_texts(tmp_path / "t.jsonl") == ["a", "b"]
    _jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(VlmpruneError, match="bad.jsonl row 2: no 'text'"):
        read_texts(tmp_path / "bad.jsonl")
