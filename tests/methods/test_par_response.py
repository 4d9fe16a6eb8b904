"""PAR's whole-response teacher: the frozen model's greedy response, teacher-forced KL over its tokens
through the engine, the response cache of a training run, and training on every family."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import vlmprune
from conftest import FAMILIES, build_model, make_batch, sample_inputs
from vlmprune.engine.plan import Plan
from vlmprune.engine.runner import prefill
from vlmprune.methods.par import PAR, RouterTrainConfig, train_router
from vlmprune.methods.par.flows import Response, flow_kl, forced_inputs, greedy_response, plan_from_masks, repeat_prepared, teacher_pass, top_mask

MAX_TOKENS = 6


def _with_eos(family: str):
    """A fresh tiny model whose EOS is a token its greedy response to the test batch emits early in
    sample 1 only: sample 1 stops there, sample 0 runs the whole `MAX_TOKENS`. Returns (pm, batch, lengths)."""
    model = build_model(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [3, 6], [4, 2], "left", seed=1)
    ids = pm.generate(**batch.kwargs(), max_new_tokens=MAX_TOKENS)[:, -MAX_TOKENS:].tolist()
    for j in range(1, MAX_TOKENS - 1):
        if ids[1][j] not in ids[0] and ids[1][j] not in ids[1][:j]:
            model.generation_config.eos_token_id = ids[1][j]
            return pm, batch, [MAX_TOKENS, j + 1]
    pytest.fail(f"no early EOS candidate in {ids}")


def _flows(n_visual: list[int], n_layers: int, per_sample: int, seed: int = 0):
    """Token and layer masks ``[B, C, .]`` of random flows (the first keeps every token and layer)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(n_visual)
    tokens = torch.zeros(len(n_visual), per_sample, width, dtype=torch.bool)
    layers = torch.ones(len(n_visual), per_sample, n_layers, dtype=torch.bool)
    for b, n in enumerate(n_visual):
        tokens[b, 0, :n] = True
        for c in range(1, per_sample):
            tokens[b, c] = top_mask(torch.rand(width, generator=gen).masked_fill(torch.arange(width) >= n, -1), torch.tensor(max(1, n // (c + 1))))
            layers[b, c] = top_mask(torch.rand(n_layers, generator=gen), torch.tensor(n_layers - c % 3))
            layers[b, c, :1] = True  # token layer 1: layer 0 runs
    return tokens, layers


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


def _append(inputs, tokens: list[int]) -> dict:
    """A sample's model inputs (unpadded) with `tokens` appended to its prompt."""
    ids = torch.cat([inputs.input_ids, torch.tensor([tokens], dtype=torch.long)], 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs.vision)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_response_kl_equals_a_token_by_token_reference(family):
    """The batched teacher-forced KL of each flow equals, per sample alone, the mean over its response
    tokens of KL(full || pruned) from separate forward passes over prompt + the response so far."""
    pm, batch, lengths = _with_eos(family)
    out = pm.generate(**batch.kwargs(), max_new_tokens=MAX_TOKENS, return_dict=True)
    response = greedy_response(pm, batch.kwargs(), MAX_TOKENS)
    assert response.lengths.tolist() == lengths and response.ids.shape == (2, MAX_TOKENS)
    assert response.mask.tolist() == [[True] * 6, [j < lengths[1] for j in range(6)]]
    prep = pm.prepare(**batch.kwargs())
    forced = forced_inputs(pm, prep, response)
    assert forced.prep.input_ids.shape[1] == prep.input_ids.shape[1] + MAX_TOKENS - 1
    teacher = teacher_pass(pm, prep, 1, 1, forced)
    # the teacher-forced distributions are the generation's own scores
    for b, n in enumerate(lengths):
        for j in range(n):
            torch.testing.assert_close(teacher.log_probs[b, j], out.scores[j][b].float().log_softmax(-1), atol=2e-5, rtol=1e-4)
    tokens, layers = _flows(batch.n_visual, pm.n_layers, 4)
    plan = plan_from_masks(tokens.flatten(0, 1), layers.flatten(0, 1), 1)
    kl = flow_kl(pm, forced, plan, teacher.log_probs, repeats=4).view(2, 4)
    assert kl[:, 0].abs().max() < 1e-5  # keeping everything changes nothing
    for b, n in enumerate(lengths):
        alone = sample_inputs(family, batch, b)
        answer = response.ids[b, :n].tolist()
        for c in range(1, 4):
            single = Plan(keep={1: [tokens[b, c].nonzero().squeeze(1)]}, skip=[(~layers[b, c]).nonzero().squeeze(1).tolist()])
            expected = 0.0
            for j in range(n):  # the pruned and the full model, each over the prompt + the first j tokens
                seen = _append(alone, answer[:j])
                full = pm(**seen).last_logits[0].float().log_softmax(-1)
                pruned = pm(**seen, prune=single).last_logits[0].float().log_softmax(-1)
                expected += _kl(full, pruned) / n
            assert float(kl[b, c]) == pytest.approx(expected, abs=1e-4, rel=1e-4)
    assert float(kl[:, 1:].min()) > 0


def test_one_response_token_is_the_first_token_kl(tiny_models):
    """response_tokens = 1: the prompt alone is run, and the KL is the old next-token KL; the router's
    inputs (layer-K hidden states, attention scores, Block Influence) are those of the prompt."""
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3, 5], [4, 2], "left")
    prep = pm.prepare(**batch.kwargs())
    response = greedy_response(pm, batch.kwargs(), 1)
    assert response.ids.shape == (2, 1) and response.lengths.tolist() == [1, 1]
    forced = forced_inputs(pm, prep, response)
    assert forced.prep is prep
    teacher = teacher_pass(pm, prep, 1, 1, forced)
    plain = teacher_pass(pm, prep, 1, 1)
    for name in ("token_scores", "layer_scores", "hidden"):
        assert torch.equal(getattr(teacher, name), getattr(plain, name))
    tokens, layers = _flows(batch.n_visual, pm.n_layers, 5, seed=3)
    plan = plan_from_masks(tokens.flatten(0, 1), layers.flatten(0, 1), 1)
    kl = flow_kl(pm, forced, plan, teacher.log_probs, repeats=5)
    # the old computation: last-token logits of the prompt, unpruned and pruned
    first = prefill(pm.adapter, prep, Plan(), logits_to_keep=1).last_logits.float().log_softmax(-1).repeat_interleave(5, 0)
    pruned = prefill(pm.adapter, repeat_prepared(prep, 5), plan, logits_to_keep=1).last_logits.float().log_softmax(-1)
    old = (first.exp() * (first - pruned)).sum(-1).clamp(min=0)
    torch.testing.assert_close(kl, old, atol=1e-6, rtol=1e-5)  # float32 rounding of the head over more rows (3e-8 seen; 2.6e-7 with one thread)
    torch.testing.assert_close(flow_kl(pm, prep, plan, plain.log_probs, repeats=5), old, atol=1e-6, rtol=1e-5)
    assert response.ids[:, 0].tolist() == pm(**batch.kwargs()).last_logits.argmax(-1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_response_kl_in_a_padded_batch_equals_the_sample_alone(tiny_models, family):
    """Left-padded prompts of different lengths, responses of different lengths (padding after the
    short one): each sample's KL equals its KL alone; repeat_prepared repeats every field (mRoPE
    positions, grids), so the repeated rows are the sample."""
    pm, batch, lengths = _with_eos(family)
    response = greedy_response(pm, batch.kwargs(), MAX_TOKENS)
    prep = pm.prepare(**batch.kwargs())
    repeated = repeat_prepared(prep, 3)
    for b in range(2):
        for i in range(3):
            r = 3 * b + i
            assert torch.equal(repeated.position_ids[:, r], prep.position_ids[:, b]) and torch.equal(repeated.inputs_embeds[r], prep.inputs_embeds[b])
            assert repeated.visual_grids[r] == prep.visual_grids[b] and repeated.n_visual[r] == prep.n_visual[b]
    forced = forced_inputs(pm, prep, response)
    teacher = teacher_pass(pm, prep, 1, 1, forced)
    tokens, layers = _flows(batch.n_visual, pm.n_layers, 3, seed=5)
    kl = flow_kl(pm, forced, plan_from_masks(tokens.flatten(0, 1), layers.flatten(0, 1), 1), teacher.log_probs, repeats=3).view(2, 3)
    assert kl[:, 0].abs().max() < 1e-5
    for b, n in enumerate(lengths):
        alone = sample_inputs(family, batch, b)
        alone_prep = pm.prepare(**alone.kwargs())
        alone_forced = forced_inputs(pm, alone_prep, Response(response.ids[b : b + 1, :n], response.lengths[b : b + 1]))
        alone_teacher = teacher_pass(pm, alone_prep, 1, 1, alone_forced)
        torch.testing.assert_close(alone_teacher.log_probs[0], teacher.log_probs[b, :n], atol=2e-5, rtol=1e-4)
        plan = plan_from_masks(tokens[b], layers[b], 1)
        torch.testing.assert_close(flow_kl(pm, alone_forced, plan, alone_teacher.log_probs, repeats=3), kl[b], atol=1e-5, rtol=1e-4)


def _counting(pm, monkeypatch) -> list:
    calls, generate = [], pm.generate
    monkeypatch.setattr(pm, "generate", lambda *a, **kw: calls.append(kw.get("max_new_tokens")) or generate(*a, **kw))
    return calls


def test_teacher_responses_are_generated_once_and_read_on_resume(tiny_models, tmp_path, monkeypatch):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batches = [make_batch("llava", model, [3, 6], [4, 2], seed=s).kwargs() for s in (0, 1)]
    calls = _counting(pm, monkeypatch)
    cfg = RouterTrainConfig(out=str(tmp_path / "run"), steps=5, save_every=2, log_every=1, response_tokens=4)
    assert train_router(cfg, pm=pm, progress=False, stop_after=3, batches=batches) is None
    assert calls == [4, 4]  # 3 steps over 2 cycled batches: each batch's response once
    folder = tmp_path / "run" / "teacher"
    assert sorted(p.name for p in folder.iterdir()) == ["batch-000000.safetensors", "batch-000001.safetensors"]
    cached = load_file(folder / "batch-000001.safetensors")
    assert torch.equal(cached["ids"], greedy_response(pm, batches[1], 4).ids) and cached["lengths"].tolist() == [4, 4]
    calls.clear()
    (folder / "batch-000001.safetensors").write_bytes(b"torn")  # unreadable: generated again
    record = train_router(cfg, pm=pm, progress=False, batches=batches)
    assert calls == [4] and [e["step"] for e in record["log"]] == [1, 2, 3, 4, 5]
    assert all(e["response_tokens"] == 4 for e in record["log"])
    # a cached response of other inputs under the same key is not reused
    calls.clear()
    other = RouterTrainConfig(out=str(tmp_path / "run2"), steps=1, response_tokens=4)
    shutil.copytree(folder, tmp_path / "run2" / "teacher")
    train_router(other, pm=pm, progress=False, batches=batches[1:])
    assert calls == [4]


@pytest.mark.parametrize("family", FAMILIES)
def test_router_trains_and_resumes_on_every_family(tiny_models, family, tmp_path):
    """A few training steps on user batches of each family; stopping and resuming gives the router
    (and log) of one uninterrupted run, and the router serves plans."""
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batches = [make_batch(family, model, [3, 6], [4, 2], seed=s).kwargs() for s in (0, 1)]
    runs = {}
    for name, stops in (("once", [None]), ("resumed", [1, 3, None])):
        cfg = RouterTrainConfig(out=str(tmp_path / name), steps=4, save_every=10, log_every=1, response_tokens=5)
        for stop in stops:
            record = train_router(cfg, pm=pm, progress=False, stop_after=stop, batches=batches)
        runs[name] = (load_file(tmp_path / name / "router.safetensors"), record)
    (once, a), (resumed, b) = runs["once"], runs["resumed"]
    assert once.keys() == resumed.keys() and all(torch.equal(once[k], resumed[k]) for k in once)
    assert a["log"] == b["log"] and len(a["log"]) == 4 and all(e["mean_kl"] > 0 for e in a["log"])
    info = json.loads((tmp_path / "resumed" / "router.json").read_text())
    assert info["train"]["response_tokens"] == 5
    out = pm(**batches[0], prune=PAR.load(tmp_path / "resumed", tokens=0.5, layers=0.5))
    out.stats.plan.validate(pm.n_layers, pm.prepare(**batches[0]).n_visual)


def test_router_train_cli_takes_response_tokens(tmp_path, monkeypatch, capsys):
    import vlmprune.methods.par as par
    from vlmprune.cli import main

    seen = []
    monkeypatch.setattr(par, "train_router", lambda cfg, **kw: seen.append(cfg))
    assert main(["router", "train", "--out", str(tmp_path / "r"), "--response-tokens", "3", "--stop-after", "1"]) == 0
    assert seen[0].response_tokens == 3
    assert main(["router", "train", "--out", str(tmp_path / "r"), "--stop-after", "1"]) == 0
    assert seen[1].response_tokens == 32
    with pytest.raises(vlmprune.VlmpruneError, match="response_tokens must be >= 1"):
        RouterTrainConfig(out="x", response_tokens=0)
