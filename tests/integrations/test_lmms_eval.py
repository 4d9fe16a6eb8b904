"""vlmprune inside lmms-eval: the offline FashionScenes tasks through lmms-eval's own evaluator against
`vlmprune.eval.evaluate` and the unmodified transformers model, the stats file, the requests' details,
the command lines (the wrapper, plain ``python -m lmms_eval``, two processes under accelerate) and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="the lmms extra: pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import vlmprune  # noqa: E402
from vlmprune.cli import main  # noqa: E402
from vlmprune.errors import VlmpruneError  # noqa: E402
from vlmprune.eval.vqa import evaluate  # noqa: E402
from vlmprune.integrations.lmms import tasks_dir  # noqa: E402
from vlmprune.integrations.lmms.model import VlmpruneLMM, _cut_at_stops  # noqa: E402
from vlmprune.testbed import eval_set  # noqa: E402
from vlmprune.testbed.encode import encode  # noqa: E402

N = 200  # questions compared with vlmprune's own evaluation


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager("WARNING", include_path=str(tasks_dir()))


@pytest.fixture(scope="module")
def testbed():
    return vlmprune.load("testbed")


def _run(lm, task_manager, task: str, limit: int):
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=task_manager, log_samples=True,
                          bootstrap_iters=0, verbosity="WARNING")
    return out["results"][task], out["samples"][task]


@pytest.mark.parametrize("method", [None, "fastv"])
def test_fashionscenes_through_lmms_eval_equals_vlmprune_eval(method, task_manager, testbed, tmp_path):
    args = "pretrained=testbed" + (",method=fastv,keep=0.25" if method else "")
    lm = VlmpruneLMM.create_from_arg_string(args + f",stats={tmp_path / 'stats.json'}", {"batch_size": 8})
    results, samples = _run(lm, task_manager, "fashionscenes", N)

    prune = vlmprune.build_method("fastv", keep=0.25) if method else None
    own = evaluate(testbed, eval_set(N), prune=prune, batch_size=32, progress=False)
    assert results["exact_match,none"] == pytest.approx(own.accuracy)
    by_doc = {s["doc_id"]: s["exact_match"] for s in samples}
    assert [by_doc[i] == 1.0 for i in range(N)] == own.correct  # the same questions right and wrong

    stats = json.loads((tmp_path / "stats.json").read_text())
    means = stats["requests"]["generate_until"]["means"]
    assert stats["requests"]["generate_until"]["totals"]["samples"] == N
    assert means["visual_tokens_in"] == pytest.approx(own.visual_tokens_in)
    assert means["visual_tokens_kept"] == pytest.approx(own.visual_tokens_kept)
    assert means["layers_run"] == pytest.approx(own.layers_run)
    assert means["lm_tflops"] == pytest.approx(own.lm_tflops, rel=1e-9)
    assert means["lm_share"] == pytest.approx(own.lm_share, rel=1e-9)
    assert stats["config"]["method"] == method and stats["processes"] == 1


def test_multiple_choice_picks_the_argmax_over_the_options(task_manager, testbed):
    lm = VlmpruneLMM.create_from_arg_string("pretrained=testbed", {"batch_size": 16})
    results, samples = _run(lm, task_manager, "fashionscenes_mc", 60)
    from vlmprune.integrations.lmms.tasks.fashionscenes.task import doc_to_choice

    where = [(i, s) for i, s in enumerate(eval_set()) if s.qtype == "where"][:60]
    options = [doc_to_choice({"answer": s.answer, "index": i}) for i, s in where]
    assert all(s.answer in o and len(o) == 4 for (_, s), o in zip(where, options))
    vocab = testbed.processor.tokenizer.get_vocab()
    inputs = encode([s for _, s in where], testbed.processor.tokenizer)
    with torch.no_grad():  # the unmodified transformers model
        last = testbed.model(**inputs).logits[:, -1].float().log_softmax(-1)
    expected = [o[int(torch.stack([last[b, vocab[c]] for c in o]).argmax())] for b, o in enumerate(options)]

    by_doc = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    chosen = [o[by_doc[b].index(min(by_doc[b]))] for b, o in enumerate(options)]  # lmms-eval: the smallest loss
    assert chosen == expected
    assert results["acc,none"] == pytest.approx(sum(c == s.answer for c, (_, s) in zip(chosen, where)) / len(where))


def _request(kind: str, context: str, second, doc_id: int, task: str = "t", metadata=None) -> Instance:
    visual = lambda doc: [doc["image"]]  # noqa: E731
    return Instance(request_type=kind, arguments=(context, second, visual, doc_id, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1, **(metadata or {})})


def _docs(samples):
    from PIL import Image

    return {"t": {"test": [{"image": Image.fromarray(s.image, mode="L")} for s in samples]}}


def test_generate_until_greedy_stops_and_batching(testbed):
    samples = eval_set(12)
    lm = VlmpruneLMM(pretrained="testbed", method="fastv", keep=0.25, batch_size=5)
    lm.task_dict = _docs(samples)
    kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["bag"]}
    requests = [_request("generate_until", s.question, dict(kwargs), i) for i, s in enumerate(samples)]
    got = [r.text for r in lm.generate_until(requests)]

    inputs = encode(samples, testbed.processor.tokenizer)  # the testbed's own encoder, one batch
    seq = testbed.generate(**inputs, prune=vlmprune.build_method("fastv", keep=0.25), max_new_tokens=4)
    tok = testbed.processor.tokenizer
    eos = set(testbed.eos_ids())
    want = []
    for row in seq[:, inputs["input_ids"].shape[1]:].tolist():
        row = row[: next((i for i, t in enumerate(row) if t in eos), len(row))]
        want.append(tok.decode(row, skip_special_tokens=True).split("bag")[0])
    assert got == want
    assert any(w != tok.decode(r) for w, r in zip(want, seq.tolist()))  # the stop string cut something or eos ended

    alone = VlmpruneLMM(pretrained="testbed", method="fastv", keep=0.25, batch_size=1)
    alone.task_dict = lm.task_dict
    assert [r.text for r in alone.generate_until(requests)] == got  # batching changes no answer


def test_padding_requests_are_answered_but_not_counted(testbed):
    samples = eval_set(3)
    lm = VlmpruneLMM(pretrained="testbed", batch_size=2)
    lm.task_dict = _docs(samples)
    kwargs = {"max_new_tokens": 1}
    requests = [_request("generate_until", s.question, dict(kwargs), i) for i, s in enumerate(samples)]
    requests.append(_request("generate_until", samples[2].question, dict(kwargs), 2, metadata={"__padding_only__": True}))
    texts = [r.text for r in lm.generate_until(requests)]
    assert texts[3] == texts[2]
    assert lm.totals["generate_until"].samples == 3


def test_loglikelihood_sums_the_continuation(testbed):
    samples = eval_set(4)
    lm = VlmpruneLMM(pretrained="testbed", batch_size=4)
    lm.task_dict = _docs(samples)
    tok = testbed.processor.tokenizer
    two = [f" {s.answer} {s.answer}" for s in samples]  # two-token continuations: the answer, then a repeat
    out = lm.loglikelihood([_request("loglikelihood", s.question, c, i) for i, (s, c) in enumerate(zip(samples, two))])
    for i, (s, res) in enumerate(zip(samples, out)):
        ids = tok(two[i], add_special_tokens=False)["input_ids"]
        prompt = encode([s], tok)
        seq = torch.cat([prompt["input_ids"], torch.tensor([ids])], 1)
        mask = torch.ones_like(seq)
        with torch.no_grad():
            logits = testbed.model(input_ids=seq, attention_mask=mask, pixel_values=prompt["pixel_values"]).logits
        lp = logits[0, prompt["input_ids"].shape[1] - 1 : -1].float().log_softmax(-1)
        nll = -lp[torch.arange(len(ids)), torch.tensor(ids)].mean()
        loss, greedy = res.text
        assert loss == pytest.approx(float(nll), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(ids)).all())


def test_cut_at_stops():
    assert _cut_at_stops("yes\nno", ["\n"]) == "yes"
    assert _cut_at_stops("a b c", ["c", "b"]) == "a "
    assert _cut_at_stops("abc", []) == "abc"


def test_multi_image_and_video_requests_are_refused():
    lm = VlmpruneLMM(pretrained="testbed")
    img = eval_set(1)[0].image
    from PIL import Image

    pil = Image.fromarray(img, mode="L")
    lm.task_dict = {"t": {"test": [{"a": 1}]}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    two = Instance("generate_until", ("q", {"max_new_tokens": 1}, lambda d: [pil, pil], 0, "t", "test"), 0, meta)
    with pytest.raises(VlmpruneError, match="2 images in one request"):
        lm.generate_until([two])
    video = Instance("generate_until", ("q", {"max_new_tokens": 1}, lambda d: ["clip.mp4"], 0, "t", "test"), 0, meta)
    with pytest.raises(VlmpruneError, match="video or audio"):
        lm.generate_until([video])


def test_model_args_build_the_cli_methods():
    lm = VlmpruneLMM.create_from_arg_string("pretrained=testbed,method=par,flops=0.5,layers=0.75")
    assert type(lm.decision).__name__ == "AtFlops" and lm.decision.share == 0.5
    lm = VlmpruneLMM.create_from_arg_string("pretrained=testbed,method=fastv+shortgpt,keep=0.25,keep_layers=5,calib=8")
    assert [type(m).__name__ for m in lm.decision] == ["FastV", "ShortGPT"]
    with pytest.raises(VlmpruneError, match="unknown pruning method"):
        VlmpruneLMM.create_from_arg_string("pretrained=testbed,method=nosuch")
    with pytest.raises(VlmpruneError, match="name it with method="):
        VlmpruneLMM.create_from_arg_string("pretrained=testbed,keep=0.25")


def test_wrapper_refuses_bad_model_args_with_exit_2(tmp_path, capsys):
    code = main(["lmms-eval", "--model", "vlmprune", "--model_args", "pretrained=testbed,method=fastv,keep=1.5",
                 "--tasks", "fashionscenes", "--output_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "keep" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def _cli(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _results(out: Path, task: str) -> float:
    (path,) = out.glob("*/*_results.json")
    return json.loads(path.read_text())["results"][task]["exact_match,none"]


def test_command_lines_and_two_processes_agree(tmp_path):
    """The wrapper, plain ``python -m lmms_eval`` (the entry point) and two processes under
    ``accelerate launch`` (gloo on the CPU): the same accuracy and summed stats."""
    common = ["--model", "vlmprune", "--model_args", "pretrained=testbed,method=fastv,keep=0.25",
              "--tasks", "fashionscenes", "--limit", "40", "--batch_size", "8"]
    runs = {
        "wrapper": [sys.executable, "-m", "vlmprune.cli", "lmms-eval", *common],
        "plain": [sys.executable, "-m", "lmms_eval", *common, "--include_path", str(tasks_dir())],
        "two": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval", *common,
                "--include_path", str(tasks_dir())],
    }
    acc, stats = {}, {}
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = _cli([*cmd, "--output_path", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        acc[name] = _results(out, "fashionscenes")
        stats[name] = json.loads((out / "vlmprune_stats.json").read_text())
    assert acc["wrapper"] == acc["plain"] == acc["two"]
    assert stats["two"]["processes"] == 2 and stats["wrapper"]["processes"] == 1
    keys = ("samples", "visual_tokens_in", "visual_tokens_kept", "layers_run", "lm_flops", "total_flops", "full_flops")
    for name in ("plain", "two"):
        for k in keys:
            assert stats[name]["all"]["totals"][k] == pytest.approx(stats["wrapper"]["all"]["totals"][k], rel=1e-9), (name, k)
    assert stats["wrapper"]["all"]["totals"]["samples"] == 40
