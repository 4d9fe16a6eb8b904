"""Every command on a user's own checkpoint (the four families, saved to disk with real processors and
chat templates) and a JSONL of real photographs; the bad-data lines; references from transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vlmprune
from vlmprune.cli import main
from vlmprune.data import encode_examples, image_channels, read_examples

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def _hf_inputs(pm, example):
    """The processor's own output for one row (all of it: transformers' Qwen models need mm_token_type_ids)."""
    from vlmprune.data import chat_prompt, conform_image

    text = chat_prompt(pm.processor, example.prompt, True)
    return dict(pm.processor(text=[text], images=[conform_image(example.image, image_channels(pm.config))], return_tensors="pt"))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_on_user_data_matches_transformers(family, user_checkpoints, photo_jsonl, tmp_path, capsys):
    """The full model's answers equal transformers' greedy generate on the chat-template prompt; the full
    model agrees with itself at KL 0; FastV's answers and per-sample JSON come out with its accounting."""
    ckpt = user_checkpoints[family]
    full_json, fastv_json = tmp_path / "full.json", tmp_path / "fastv.json"
    code, out, err = _run(capsys, "eval", "--model", ckpt, "--data", photo_jsonl, "--max-new-tokens", 4, "--batch-size", 4,
                          "--json", full_json)
    assert code == 0, err
    full = json.loads(full_json.read_text())
    assert full["n"] == 6 and full["agreement"] == 1.0 and full["mean_kl"] == pytest.approx(0, abs=1e-6)
    assert full["n_answers"] == 6 and 0 <= full["accuracy"] <= 1 and "agreement with the full model 100.0%" in out

    import transformers

    ref = transformers.AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    pm = vlmprune.load(ckpt)
    examples = read_examples(photo_jsonl)
    for i in (0, 5):
        inputs = _hf_inputs(pm, examples[i])
        seq = ref.generate(**inputs, do_sample=False, max_new_tokens=4)[0, inputs["input_ids"].shape[1] :].tolist()
        eos = ref.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        end = next((k + 1 for k, t in enumerate(seq) if t in eos), len(seq))
        assert full["samples"][i]["answer"] == pm.processor.tokenizer.decode(seq[:end], skip_special_tokens=True).strip()

    code, out, err = _run(capsys, "eval", "--model", ckpt, "--data", photo_jsonl, "--max-new-tokens", 4, "--batch-size", 4,
                          "--method", "fastv", "--layer", 2, "--keep", 0.5, "--json", fastv_json)
    assert code == 0, err
    fastv = json.loads(fastv_json.read_text())
    assert fastv["visual_tokens_kept"] < fastv["visual_tokens_in"] and fastv["lm_share"] < 1
    assert [s["full_answer"] for s in fastv["samples"]] == [s["answer"] for s in full["samples"]]
    assert fastv["mean_kl"] > 0 and fastv["decode_ms_per_token"] > 0 and fastv["prefill_ms_per_sample"] > 0


def test_response_kl_equals_a_brute_force_reference(user_checkpoints, photo_jsonl):
    """KL(full || pruned) over the full response, against transformers run over prompt + response with
    decoder layer 3 removed (what --skip 3 computes), written straight from the definition."""
    import copy

    import transformers

    from vlmprune.eval.answers import evaluate_answers

    ckpt = user_checkpoints["llava"]
    pm = vlmprune.load(ckpt)
    examples = read_examples(photo_jsonl)[:3]
    got = evaluate_answers(pm, examples, prune=vlmprune.Plan(skip=[3]), batch_size=3, max_new_tokens=5, progress=False)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    cut = copy.deepcopy(ref)
    lm = cut.model.language_model
    lm.layers = torch.nn.ModuleList([layer for i, layer in enumerate(lm.layers) if i != 3])
    lm.config.num_hidden_layers = 5
    for ex, sample in zip(examples, got.samples):
        inputs = encode_examples(pm.processor, [ex], image_channels(pm.config))
        n = inputs["input_ids"].shape[1]
        seq = ref.generate(**inputs, do_sample=False, max_new_tokens=5)
        new = seq[0, n:].tolist()
        eos = ref.generation_config.eos_token_id
        end = next((k + 1 for k, t in enumerate(new) if t == eos), len(new))
        forced = dict(inputs, input_ids=seq[:, : n + end], attention_mask=torch.ones(1, n + end, dtype=torch.long))
        with torch.no_grad():
            p = ref(**forced, use_cache=False).logits[0, n - 1 : n + end - 1].float().log_softmax(-1)
            q = cut(**forced, use_cache=False).logits[0, n - 1 : n + end - 1].float().log_softmax(-1)
        want = float((p.exp() * (p - q)).sum(-1).mean())
        assert sample["kl"] == pytest.approx(want, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_weights_router_and_sweep_on_user_data(family, user_checkpoints, photo_jsonl, tmp_path, capsys):
    ckpt = user_checkpoints[family]
    out = tmp_path / "pruned"
    code, _, err = _run(capsys, "prune-weights", "--model", ckpt, "--data", photo_jsonl, "--calib", 4, "--sparsity", 0.5,
                        "--out", out)
    assert code == 0, err
    weights = load_file(out / "model.safetensors")
    mlp = [v for k, v in weights.items() if "vis" not in k and k.endswith("mlp.down_proj.weight")]
    assert mlp and all(abs(float((w == 0).float().mean()) - 0.5) < 0.02 for w in mlp)
    assert vlmprune.load(out).processor is not None

    router = tmp_path / "router"
    code, _, err = _run(capsys, "router", "train", "--model", ckpt, "--data", photo_jsonl, "--steps", 2, "--batch-size", 3,
                        "--out", router)
    assert code == 0, err
    assert (router / "router.json").is_file()

    sweep_dir = tmp_path / "sweep"
    code, table, err = _run(capsys, "sweep", "--model", ckpt, "--data", photo_jsonl, "--methods", "fastv,par-tokens",
                            "--router", router, "--keep", 0.5, "--out", sweep_dir, "--no-latency", "--max-new-tokens", 3,
                            "--batch-size", 3)
    assert code == 0, err
    points = json.loads((sweep_dir / "results.json").read_text())["points"]
    assert [p["method"] for p in points] == ["full", "fastv", "par-tokens"]
    assert points[0]["agreement"] == 1.0 and all(p["metric"] == "accuracy" for p in points)
    assert all(p["visual_tokens_kept"] < p["visual_tokens_in"] for p in points[1:])
    assert "data.jsonl accuracy of" in table


def test_shortgpt_calibrates_on_user_data(user_checkpoints, photo_jsonl, capsys, tmp_path):
    ckpt = user_checkpoints["qwen2_vl"]
    args = ["eval", "--model", ckpt, "--data", photo_jsonl, "--max-new-tokens", 2, "--method", "shortgpt", "--keep-layers", 5]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "--calib-data" in err
    code, out, err = _run(capsys, *args, "--calib-data", photo_jsonl, "--calib", 4)
    assert code == 0, err
    assert "layers run 5.00" in out


@pytest.mark.parametrize("row, message", [
    ({"image": "images/nope.jpg", "prompt": "q"}, "row 2: image file"),
    ({"image": "images/coffee.jpg"}, "row 2: no 'prompt'"),
    ('{"image": ', "row 2: invalid JSON"),
])
def test_bad_rows_exit_2_naming_file_and_row(row, message, user_checkpoints, photo_jsonl, tmp_path, capsys):
    bad = photo_jsonl.parent / f"bad_{abs(hash(message))}.jsonl"
    first = photo_jsonl.read_text().splitlines()[0]
    bad.write_text(first + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    for argv in (["eval", "--model", user_checkpoints["llava"], "--data", bad],
                 ["prune-weights", "--model", user_checkpoints["llava"], "--data", bad, "--calib", 2, "--out", tmp_path / "o"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and f"{bad} {message}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_data_and_too_many_samples_exit_2(user_checkpoints, photo_jsonl, tmp_path, capsys):
    ckpt = user_checkpoints["llava_next"]
    for argv, message in [
        (["eval", "--model", ckpt], "pass --data"),
        (["prune-weights", "--model", ckpt, "--out", tmp_path / "o"], "pass --data"),
        (["router", "train", "--model", ckpt, "--out", tmp_path / "r"], "pass --data"),
        (["prune-weights", "--model", ckpt, "--data", photo_jsonl, "--calib", 50, "--out", tmp_path / "o"],
         "--calib 50 asks for more samples than"),
        (["eval", "--model", ckpt, "--data", tmp_path / "none.jsonl"], "is neither a file"),
    ]:
        code, _, err = _run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_rgb_photographs_on_the_one_channel_testbed(photo_jsonl, capsys):
    """The testbed's tower takes 1 channel: the photographs are converted to greyscale, with a notice."""
    from vlmprune.data import images

    images._noticed.clear()  # the notice is printed once per process
    code, out, err = _run(capsys, "eval", "--model", "testbed", "--data", photo_jsonl, "--max-new-tokens", 2, "--limit", 3)
    assert code == 0, err
    assert "greyscale" in err and "3 samples" in out


def test_eval_data_testbed_equals_the_one_token_evaluation(capsys):
    code, a, err = _run(capsys, "eval", "--limit", 64)
    assert code == 0, err
    code, b, err = _run(capsys, "eval", "--data", "testbed", "--limit", 64)
    assert code == 0, err
    assert a.splitlines()[0] == b.splitlines()[0] and a.startswith("accuracy")


def test_a_causal_lm_calibrates_on_the_users_text(tmp_path, capsys):
    """A text-only LM reads JSONL {"text": ...} rows (or a text file): the calibration rows are the first
    --calib x 128 tokens of that text, as the tokenizer cuts them."""
    import transformers
    from pydoc_data.topics import topics

    from checkpoints import build_tokenizer
    from vlmprune.weights import calibration_batches

    tokenizer = build_tokenizer("llava")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer) + 64, max_position_embeddings=512))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    texts = [topics[k] for k in sorted(topics)[:40]]
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    batches = calibration_batches(model, tokenizer, 4, data=str(data))
    want = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][: 4 * 128]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).flatten(), torch.tensor(want))
    code, _, err = _run(capsys, "prune-weights", "--model", tmp_path / "lm", "--data", data, "--calib", 4, "--sparsity", 0.5,
                        "--out", tmp_path / "out")
    assert code == 0, err
    code, _, err = _run(capsys, "prune-weights", "--model", tmp_path / "lm", "--data", data, "--calib", 4000, "--out",
                        tmp_path / "out2")
    assert code == 2 and "fewer than --calib 4000 x 128" in err


def test_an_image_the_processor_cannot_take_names_the_row(user_checkpoints, photo_jsonl, tmp_path, capsys):
    """Qwen's processor refuses a 300:1 image; the error names the file and the row, exit 2."""
    from PIL import Image

    Image.new("RGB", (900, 3), (10, 20, 30)).save(photo_jsonl.parent / "thin.png")
    bad = photo_jsonl.parent / "thin.jsonl"
    bad.write_text(photo_jsonl.read_text().splitlines()[0] + "\n" + json.dumps({"image": "thin.png", "prompt": "q"}) + "\n")
    code, _, err = _run(capsys, "eval", "--model", user_checkpoints["qwen2_vl"], "--data", bad, "--max-new-tokens", 2)
    assert code == 2 and f"{bad} row 2: the model's processor cannot take this row: absolute aspect ratio" in err
