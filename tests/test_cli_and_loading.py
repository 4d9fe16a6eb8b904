"""`vlmprune generate` and `vlmprune.load` on a local checkpoint of the testbed recipe, bad inputs included."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from vlmprune.cli import main

PROMPT = "user : <image> what is in the image ? assistant :"


def test_load_gives_the_saved_model_and_processor(checkpoint):
    pm = vlmprune.load(checkpoint)
    assert pm.processor is not None and pm.n_layers == 8
    import transformers

    ref = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint)
    for (name, a), (_, b) in zip(pm.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_generate_prints_answer_and_stats(checkpoint, image, capsys):
    plan = json.dumps({"keep": {"2": [list(range(0, 144, 4))]}})
    assert main(["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT, "--plan", plan, "--skip", "5", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "layers run 7/8" in out and "visual tokens in -> out 144 -> 36" in out


def test_skip_keeps_the_plans_merge_and_overhead(tmp_path):
    from vlmprune.prompting import parse_plan

    keep = [[0, 2, 5], [1, 3, 4]]
    merge = [[0, 0, 2, 2, -1, 5], [1, 1, 3, 3, 4, -1]]  # each kept token maps to itself
    data = {"keep": {"2": keep}, "skip": [1], "merge": {"2": merge}, "overhead": [1000.0, 2000.0]}
    expected = vlmprune.Plan.from_dict({**data, "skip": [1, 5, 6]})  # the plan itself, skips joined
    (tmp_path / "plan.json").write_text(json.dumps(data))
    for text in (json.dumps(data), str(tmp_path / "plan.json")):
        plan = parse_plan(text, "6,5")
        assert plan == expected and plan.to_dict()["merge"] == {"2": merge} and plan.overhead == (1000.0, 2000.0)
    assert parse_plan(json.dumps(data), None) == vlmprune.Plan.from_dict(data)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png", "--prompt", PROMPT], "does not exist"),
        (["--prompt", PROMPT], "no image was given"),
        (["--image", "IMG", "--prompt", "what is in the image ?"], "no image placeholder"),
        (["--image", "IMG", "--prompt", PROMPT, "--plan", '{"keep": {"9": [[1]]}}'], "K=9 is out of range"),
        (["--image", "IMG", "--prompt", PROMPT, "--plan", '{"keep": {"2": [[1, 144]]}}'], "index 144 is out of range"),
        (["--image", "IMG", "--prompt", PROMPT, "--plan", '{"keep": {"2": [[3, 3]]}}'], "duplicated"),
        (["--image", "IMG", "--prompt", PROMPT, "--skip", "1,x"], "comma-separated"),
        (["--image", "IMG", "--prompt", PROMPT, "--plan", "{oops"], "neither a JSON file"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(checkpoint, image, capsys, extra, message):
    args = ["generate", "--model", str(checkpoint)] + [str(image) if a == "IMG" else a for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_generate_with_methods(checkpoint, image, capsys):
    base = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert main(base + ["--method", "fastv", "--keep", "0.25", "--layer", "3"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens in -> out 144 -> 36" in out and "layer  2: run  visual=  144" in out and "layer  3: run  visual=   36" in out
    assert main(base + ["--method", "pool,random-layers", "--keep", "36", "--keep-layers", "6"]) == 0
    assert "layers run 6/8, visual tokens in -> out 36 -> 36" in capsys.readouterr().out
    assert main(base + ["--method", "fastv", "--keep", "0.25", "--skip", "7"]) == 0
    assert "layers run 7/8, visual tokens in -> out 144 -> 36" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nosuch"], "unknown pruning method 'nosuch'; known methods:"),
        (["--method", "fastv", "--keep", "1.5"], r"outside \(0, 1\]"),
        (["--method", "fastv", "--keep-layers", "3"], "not taken by fastv"),
        (["--method", "fastv", "--keep", "200"], "only 144; use a count <= 144"),
        (["--method", "fastv", "--layer", "8"], "layer=8 is out of range"),
        (["--method", "fastv", "--plan", "{}"], "either --method or --plan"),
    ],
)
def test_bad_method_options_exit_2(checkpoint, image, capsys, extra, message):
    args = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_console_entry_point_exits_2_without_traceback(checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "vlmprune.cli", "generate", "--model", str(checkpoint), "--image", "nope.png", "--prompt", PROMPT],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_an_rgb_image_of_another_size_is_converted_for_the_testbed(tmp_path, capsys):
    """The shipped 1-channel testbed, given a colour photo of another size: converted to greyscale with
    the once-per-process notice, and the processor's resize and crop do the rest."""
    from vlmprune.data import images
    from vlmprune.prompting import build_inputs, generate_answer

    pm = vlmprune.load("testbed")
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 100, 3), dtype="uint8"))
    images._noticed.clear()
    inputs = build_inputs(pm, PROMPT, photo)
    assert "greyscale" in capsys.readouterr().err
    reference = pm.processor(text=PROMPT, images=photo.convert("L"), return_tensors="pt")  # grey by hand
    assert inputs["pixel_values"].shape == (1, 1, 84, 84)
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    answer, _ = generate_answer(pm, PROMPT, photo, max_new_tokens=1)
    assert answer and "greyscale" not in capsys.readouterr().err  # once per process
    with pytest.raises(vlmprune.VlmpruneError, match="mode 'I;16'"):  # what cannot be converted: one clear line
        build_inputs(pm, PROMPT, Image.new("I;16", (90, 90)))

    path = tmp_path / "photo.png"
    photo.save(path)
    proc = subprocess.run(
        [sys.executable, "-m", "vlmprune.cli", "generate", "--model", "testbed", "--image", str(path), "--prompt", PROMPT,
         "--max-new-tokens", "1"], capture_output=True, text=True,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("greyscale") == 1 and "layers run" in proc.stdout
    Image.new("I;16", (90, 90)).save(tmp_path / "deep.png")
    proc = subprocess.run(
        [sys.executable, "-m", "vlmprune.cli", "generate", "--model", "testbed", "--image", str(tmp_path / "deep.png"),
         "--prompt", PROMPT], capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_corrupt_checkpoint_and_unsupported_model(checkpoint, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(vlmprune.VlmpruneError, match="cannot load weights"):
        vlmprune.load(bad)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(vlmprune.VlmpruneError, match="'llama' is not supported.*LlavaForConditionalGeneration"):
        vlmprune.load(llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(vlmprune.VlmpruneError, match="no config.json"):
        vlmprune.load(tmp_path / "empty")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of network retries
    with pytest.raises(vlmprune.VlmpruneError, match="not a local directory"):
        vlmprune.load("nobody/no-such-model-offline")
