"""The weight-pruning pipeline on tiny random models: achieved sparsity equals the allocation (exact floor
counts per row for Wanda), N:M holds in every group, everything outside the blocks is untouched, ECoFLaP
and OWL meet the global budget exactly within the cap, a saved checkpoint reloads with the same zeros and
is never left half-written, a weight-pruned model still runs with a token method, and the CLI."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import vlmprune
from conftest import TEXT, build_model, make_batch
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.testbed import data
from vlmprune.testbed.recipe import build_tokenizer, random_checkpoint
from vlmprune.weights import SparsityReport, prune_count, prune_weights, save_pruned, scene_batches, text_batches

HAVE_FASHION_MNIST = data.DEFAULT_ROOT.is_dir()


def _llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()


def _setup(family):
    if family == "llama":
        model = _llama()
        ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
        return model, [dict(input_ids=ids, attention_mask=torch.ones_like(ids))]
    model = build_model(family)
    return model, [make_batch(family, model, [3, 5], [4, 2]).kwargs()]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, before, report):
    """Every tensor but the pruned linears' weights is bit-identical (embeddings, head, norms, biases...)."""
    pruned = {f"{name}.weight" for name in report.achieved}
    after = model.state_dict()
    for key, value in before.items():
        if key not in pruned:
            assert torch.equal(after[key], value), key
    assert not any("embed" in k or "lm_head" in k or "projector" in k or "merger" in k for k in pruned)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_uniform_wanda_zeroes_the_floor_count_of_every_row(family):
    model, batches = _setup(family)
    before = _snapshot(model)
    report = prune_weights(model, batches, method="uniform", local="wanda", sparsity=0.37, progress=False)
    linears = dict(model.named_modules())
    assert len(report.achieved) == len([n for n in report.achieved if n in linears]) > 0
    for name, share in report.achieved.items():
        weight = linears[name].weight
        rows, cols = weight.shape
        assert report.allocated[name] == 0.37
        per_row = (weight == 0).sum(1)
        assert (per_row == prune_count(0.37, cols)).all(), name
        assert share == prune_count(0.37, cols) / cols
    n_vision = sum(".visual." in n or ".vision_tower." in n for n in report.achieved)
    assert (n_vision > 0) == (family != "llama")  # the tower's blocks are pruned too
    _untouched(model, before, report)
    zeros = sum(int((linears[n].weight == 0).sum()) for n in report.achieved)
    assert report.overall == zeros / report.pruned_params
    assert report.calibration_samples == batches[0]["input_ids"].shape[0] and report.calibration_batches == 1


@pytest.mark.parametrize("local", ["wanda", "sparsegpt", "magnitude"])
def test_nm_holds_in_every_group(local):
    model, batches = _setup("llava")
    before = _snapshot(model)
    report = prune_weights(model, batches, local=local, nm="2:4", progress=False)
    assert report.nm == "2:4" and report.target == 0.5
    linears = dict(model.named_modules())
    for name in report.achieved:
        weight = linears[name].weight
        groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)  # (out, in / 4) zeros per group
        assert (groups == 2).all(), name
    _untouched(model, before, report)


@pytest.mark.parametrize(
    "order, granularity, allocation",
    [("zeroth", "block", "released"), ("zeroth", "layer", "released"), ("first", "block", "released"),
     ("first", "layer", "released"), ("zeroth", "block", "clamped"), ("first", "layer", "clamped")],
)
def test_ecoflap_meets_the_budget_exactly_within_the_cap(order, granularity, allocation):
    model, batches = _setup("llava")
    before = _snapshot(model)
    report = prune_weights(model, batches, method="ecoflap", local="sparsegpt", sparsity=0.5, order=order,
                           granularity=granularity, cap=0.15, allocation=allocation, progress=False)
    linears = dict(model.named_modules())
    sizes = {n: linears[n].weight.numel() for n in report.allocated}
    kept = sum((1 - s) * sizes[n] for n, s in report.allocated.items())
    shares = list(report.allocated.values())
    if allocation == "released":  # whole weights: floor((1 - target) * total); bounded by s_max and 0 only
        assert kept == pytest.approx(int(0.5 * sum(sizes.values())), abs=1e-6)
        assert all(0 <= s <= 0.65 + 1 / sizes[n] for n, s in report.allocated.items())
    else:
        assert kept == pytest.approx(0.5 * sum(sizes.values()), rel=1e-9)
        assert all(0.35 - 1e-12 <= s <= 0.65 + 1e-12 for s in shares)
    assert max(shares) - min(shares) > 0.05  # a real allocation, not the uniform one
    if granularity == "block":  # the linears of a block share one sparsity
        by_block = {}
        for name, s in report.allocated.items():
            by_block.setdefault(name.rsplit(".", 2)[0], set()).add(s)
        assert all(len(v) == 1 for v in by_block.values())
    for name, s in report.allocated.items():  # SparseGPT counts per block of <= 128 columns: the whole matrix here
        weight = linears[name].weight
        assert int((weight == 0).sum()) == prune_count(s, weight.numel()), name
    assert (report.order, report.cap, report.allocation) == (order, 0.15, allocation)
    assert report.score == ("grad" if order == "zeroth" else "grad-weight")  # the released scripts' scores
    assert report.zeroth_mode == ("per-matrix" if order == "zeroth" else None)
    _untouched(model, before, report)


def test_owl_meets_the_budget_and_spreads_twice_its_own_lambda():
    model, batches = _setup("qwen2_vl")
    report = prune_weights(model, batches, method="owl", local="magnitude", sparsity=0.5, progress=False)
    assert (report.owl_lambda, report.owl_m, report.cap) == (0.08, 5.0, None)  # OWL's README recipe; cap is ECoFLaP's
    linears = dict(model.named_modules())
    sizes = {n: linears[n].weight.numel() for n in report.allocated}
    kept = sum((1 - s) * sizes[n] for n, s in report.allocated.items())
    assert kept == pytest.approx(0.5 * sum(sizes.values()), rel=1e-9)
    shares = list(report.allocated.values())
    assert max(shares) - min(shares) == pytest.approx(0.16)
    for name, s in report.allocated.items():  # magnitude counts across the matrix
        assert int((linears[name].weight == 0).sum()) == prune_count(s, sizes[name])
    other = prune_weights(build_model("qwen2_vl"), batches, method="owl", local="magnitude", sparsity=0.5,
                          owl_lambda=0.05, owl_m=2.0, cap=0.3, progress=False)
    shares = list(other.allocated.values())
    assert max(shares) - min(shares) == pytest.approx(0.1)  # 2 x owl_lambda; cap plays no part
    assert [u["score"] for u in other.units] != [u["score"] for u in report.units]  # M = 2 counts other outliers


@pytest.mark.parametrize(
    "options",
    [dict(method="ecoflap"), dict(method="ecoflap", allocation="clamped", zeroth_mode="block", score="grad-weight"),
     dict(method="ecoflap", order="first", granularity="layer"), dict(method="owl", owl_lambda=0.05), dict(method="uniform")],
)
def test_sparsity_json_lists_the_units_and_rederives_the_allocation(options, tmp_path):
    """sparsity.json's "units" (name, params, score, allocated) are enough to recompute every unit's
    sparsity with the allocation functions alone, and the units' sparsities are the linears'."""
    from vlmprune.weights import allocate, ecoflap_allocate, owl_sparsities

    model, batches = _setup("llava")
    report = prune_weights(model, batches, local="magnitude", sparsity=0.6, progress=False, **options)
    save_pruned(model, None, report, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    units = saved["units"]
    assert [sorted(u) for u in units] == [["allocated", "name", "params", "score"]] * len(units)
    linears = dict(model.named_modules())
    for unit in units:  # each unit's linears: its params and its sparsity
        names = [n for n in report.allocated if n == unit["name"] or n.startswith(unit["name"] + ".")]
        assert names and unit["params"] == sum(linears[n].weight.numel() for n in names)
        assert all(report.allocated[n] == unit["allocated"] for n in names)
    assert sum(u["params"] for u in units) == report.pruned_params
    scores, params, allocated = [u["score"] for u in units], [u["params"] for u in units], [u["allocated"] for u in units]
    target = saved["target"]
    if saved["method"] == "uniform":
        assert scores == [None] * len(units) and allocated == [target] * len(units)
    elif saved["method"] == "owl":
        assert owl_sparsities(scores, target, lam=saved["owl_lambda"], sizes=params) == allocated
    elif saved["allocation"] == "released":
        assert ecoflap_allocate(scores, target, sizes=params, cap=saved["cap"]) == allocated
    else:
        assert allocate([t / n for t, n in zip(scores, params)], target, cap=saved["cap"], sizes=params) == allocated
    assert len(set(allocated)) > 1 or saved["method"] == "uniform"


def test_first_order_takes_each_samples_gradient_alone():
    """First order = |w| x mean over samples of |dL_i/dw|, each sample's loss alone (padding trimmed),
    as ECoFLaP's batch-1 loader: equal to a brute-force loop over the samples, and not the |gradient|
    of the whole batch, where the signs of different samples cancel."""
    from vlmprune.weights.samples import calibration_loss

    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 200, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    batches = [dict(input_ids=ids, attention_mask=mask)]
    report = prune_weights(_llama(), batches, method="ecoflap", order="first", sparsity=0.5, progress=False)
    got = [u["score"] for u in report.units]

    def brute(rows):
        model = _llama()
        layers = model.model.layers
        totals = [0.0] * len(layers)
        for row in rows:
            model.zero_grad()
            calibration_loss(model, row).backward()
            for b, layer in enumerate(layers):
                totals[b] += sum((m.weight.detach().abs() * m.weight.grad.abs()).sum().item()
                                 for m in layer.modules() if isinstance(m, torch.nn.Linear)) / len(rows)
        return totals

    samples = []
    for i in range(3):
        keep = mask[i].bool()
        samples.append(dict(input_ids=ids[i : i + 1, keep], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long)))
    assert got == pytest.approx(brute(samples), rel=1e-5)
    whole = brute(batches)
    assert all(w < g for w, g in zip(whole, got))  # the batch gradient's signs cancel
    assert report.score_samples == 3


@pytest.mark.parametrize("order", ["zeroth", "first"])
def test_reused_scores_give_the_masks_of_scoring_again(order):
    """ECoFLaP at another sparsity and local pruner from an earlier report's scores: the same weights as
    running the score step again (the scores depend on neither)."""
    model, batches = _setup("llama")
    dense = _snapshot(model)
    first = prune_weights(model, batches, method="ecoflap", order=order, sparsity=0.5, progress=False)
    scores = {u["name"]: u["score"] for u in first.units}
    model.load_state_dict(dense)
    again = prune_weights(model, batches, method="ecoflap", order=order, sparsity=0.7, local="sparsegpt", progress=False)
    scored = _snapshot(model)
    model.load_state_dict(dense)
    reused = prune_weights(model, batches, method="ecoflap", order=order, sparsity=0.7, local="sparsegpt", progress=False,
                           scores=scores)
    assert reused.units == again.units and reused.allocated == again.allocated
    assert all(torch.equal(v, scored[k]) for k, v in model.state_dict().items())
    with pytest.raises(VlmpruneError, match="must give exactly this model's units"):
        prune_weights(model, batches, method="ecoflap", sparsity=0.5, progress=False, scores={"model.layers.0": 1.0})
    with pytest.raises(VlmpruneError, match="reads no scores"):
        prune_weights(model, batches, method="uniform", sparsity=0.5, progress=False, scores=scores)


def test_a_weight_pruned_model_runs_with_a_token_method():
    model, batches = _setup("llava")
    prune_weights(model, batches, method="uniform", local="sparsegpt", sparsity=0.5, progress=False)
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [2, 4], [3, 1], seed=3)
    out = pm(**batch.kwargs(), prune=vlmprune.FastV(layer=1, keep=0.5))
    assert torch.isfinite(out.last_logits).all()
    assert out.stats.summary()  # the engine ran and accounted
    ids = pm.generate(**batch.kwargs(), prune=vlmprune.FastV(layer=1, keep=0.5), max_new_tokens=2)
    assert ids.shape == (2, batch.input_ids.shape[1] + 2)


# ----------------------------------------------------------------------------- saving


def _fake_scenes(n, seed=0):
    """FashionScenes training-style samples from random 28x28 items (no Fashion-MNIST needed)."""
    rng = np.random.default_rng(seed)
    source = (rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10)
    return data.generate(n, "train", seed=seed, source=source)


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("testbed") / "model")


def test_save_pruned_reloads_with_the_same_zeros(testbed_dir, tmp_path):
    from vlmprune.testbed.encode import encode

    pm = vlmprune.load(testbed_dir)
    batches = [encode(_fake_scenes(3), pm.processor.tokenizer)]
    report = prune_weights(pm, batches, local="wanda", sparsity=0.6, patterns=["*.mlp.*"], progress=False)
    assert isinstance(report, SparsityReport) and all(".mlp." in n for n in report.achieved)
    out = save_pruned(pm, pm.processor, report, tmp_path / "pruned")
    assert {"config.json", "model.safetensors", "sparsity.json", "sparsity.png", "processor_config.json"} <= set(os.listdir(out))
    assert os.listdir(tmp_path) == ["pruned"]  # no temporary directory left
    saved = json.loads((out / "sparsity.json").read_text())
    for key in ("target", "overall", "achieved", "allocated", "method", "local", "calibration_samples", "seconds", "peak_memory_bytes"):
        assert key in saved
    assert saved["target"] == 0.6 and saved["calibration_samples"] == 3 and saved["plot"] == "sparsity.png"
    assert saved["achieved"] == pytest.approx(report.achieved)

    state = pm.model.state_dict()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    reloaded = vlmprune.load(out)
    assert reloaded.processor is not None
    for model in (hf, reloaded.model):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
    name = next(iter(report.achieved))
    assert (hf.get_submodule(name).weight == 0).float().mean().item() == report.achieved[name]


def test_save_refuses_an_existing_directory_unless_overwrite(tmp_path):
    model, batches = _setup("llama")
    report = prune_weights(model, batches, local="magnitude", sparsity=0.5, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(VlmpruneError, match="already exists.*--overwrite"):
        save_pruned(model, None, report, out)
    assert os.listdir(out) == ["old.txt"]
    save_pruned(model, None, report, out, overwrite=True)
    assert "old.txt" not in os.listdir(out) and (out / "sparsity.json").is_file()
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model, batches = _setup("llama")
    report = prune_weights(model, batches, local="magnitude", sparsity=0.5, progress=False)

    def broken(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, report, tmp_path / "out")
    assert os.listdir(tmp_path) == []
    (tmp_path / "keep").mkdir()  # an existing directory survives a failed overwrite
    (tmp_path / "keep" / "a.txt").write_text("x")
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, report, tmp_path / "keep", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["keep"] and os.listdir(tmp_path / "keep") == ["a.txt"]


def test_zeroth_order_scores_each_sample_alone_and_reports_the_samples_used():
    """Text rows split into one-sample batches (padding trimmed) whose losses are the rows' own; the
    report counts the samples the scores used (zeroth: `score_samples`, first: all)."""
    from vlmprune.weights.samples import calibration_loss, first_samples, split_samples

    model = _llama()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 200, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    batches = [dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids[:2], attention_mask=mask[:2])]
    rows = split_samples(first_samples(batches, 4, None), None)
    assert [r["input_ids"].shape for r in rows] == [(1, 9), (1, 5), (1, 9), (1, 9)]
    assert torch.equal(rows[1]["input_ids"][0], ids[1, 4:])
    with torch.no_grad():
        alone = calibration_loss(model, dict(input_ids=ids[1:2, 4:], attention_mask=torch.ones(1, 5, dtype=torch.long)))
        assert float(calibration_loss(model, rows[1])) == pytest.approx(float(alone), rel=1e-6)
    zeroth = prune_weights(_llama(), batches, method="ecoflap", sparsity=0.5, score_samples=4, progress=False)
    first = prune_weights(_llama(), batches, method="ecoflap", order="first", sparsity=0.5, progress=False)
    uniform = prune_weights(_llama(), batches, sparsity=0.5, progress=False)
    assert (zeroth.score_samples, first.score_samples, uniform.score_samples) == (4, 5, None)
    assert (zeroth.score_directions, first.score_directions) == (4, None)  # 9-token rows: shorter than 2 pieces
    assert zeroth.allocation_seconds > 0 and zeroth.seconds > zeroth.allocation_seconds and zeroth.peak_memory_bytes > 0


def test_zeroth_order_cuts_text_samples_into_pieces_with_a_direction_each():
    """Pieces of `score_tokens` tokens tile each one-sample text batch in order (a short tail joins the
    last piece); image batches stay whole; the report counts one direction per piece."""
    from vlmprune.weights.samples import pieces

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 200, (1, 23), generator=gen)
    row = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    cut = pieces([row], 8)
    assert [p["input_ids"].shape[1] for p in cut] == [8, 8, 7]
    assert torch.equal(torch.cat([p["input_ids"] for p in cut], 1), ids)
    assert [p["input_ids"].shape[1] for p in pieces([dict(input_ids=ids[:, :19], attention_mask=torch.ones(1, 19))], 8)] == [8, 11]
    image = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(1, 3, 4, 4))
    assert pieces([image], 8) == [image] and pieces([row], 0) == [row]
    batches = [dict(input_ids=torch.randint(3, 200, (2, 20), generator=gen), attention_mask=torch.ones(2, 20, dtype=torch.long))]
    report = prune_weights(_llama(), batches, method="ecoflap", sparsity=0.5, score_samples=2, score_tokens=5, progress=False)
    assert (report.score_samples, report.score_directions) == (2, 8)
    with pytest.raises(VlmpruneError, match="score_tokens"):
        prune_weights(_llama(), batches, method="ecoflap", sparsity=0.5, score_tokens=-1, progress=False)


@pytest.mark.parametrize("family, splits", [("llava", True), ("qwen2_vl", False)])
def test_only_batches_with_one_row_per_sample_split(family, splits):
    from vlmprune.weights.samples import split_samples

    model, batches = _setup(family)
    image_id = model.config.image_token_id
    rows = split_samples(batches, image_id)
    assert len(rows) == (batches[0]["input_ids"].shape[0] if splits else 1)
    if splits:  # each one-image sample keeps its own image
        for i, row in enumerate(rows):
            assert torch.equal(row["pixel_values"][0], batches[0]["pixel_values"][i])
        uneven = dict(batches[0], input_ids=batches[0]["input_ids"].clone())
        uneven["input_ids"][0][uneven["input_ids"][0] == image_id] = 5  # sample 0 loses its image tokens
        assert len(split_samples([uneven], image_id)) == 1


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"outside \[0, 1\)"),
        (dict(sparsity=-0.1), r"outside \[0, 1\)"),
        (dict(method="ecoflap", nm="2:4"), "method='uniform'"),
        (dict(nm="2:4", sparsity=0.3), "disagrees with nm"),
        (dict(nm="3:2"), "0 < N < M"),
        (dict(method="sparse"), "uniform, owl, ecoflap"),
        (dict(local="obs"), "wanda, sparsegpt, magnitude"),
        (dict(patterns=["*.nothing.*"]), "matches no linear"),
        (dict(method="ecoflap", sparsity=0.95, cap=0.1), "must stay below 1"),
        (dict(method="ecoflap", allocation="proportional"), "allocation='proportional' is not one of released, clamped"),
        (dict(method="ecoflap", zeroth_mode="layer"), "zeroth_mode='layer' is not one of per-matrix, block"),
        (dict(method="ecoflap", score="taylor"), "score='taylor' is not one of grad, grad-weight"),
        (dict(method="owl", owl_lambda=-0.1), r"owl_lambda=-0.1 must be a finite number >= 0"),
        (dict(method="owl", owl_m=float("inf")), r"owl_m=inf must be a finite number >= 0"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    model, batches = _setup("llama")
    before = _snapshot(model)
    with pytest.raises(VlmpruneError, match=message):
        prune_weights(model, batches, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calibration_data_is_required_and_checked():
    model, _ = _setup("llama")
    with pytest.raises(VlmpruneError, match="needs calibration data"):
        prune_weights(model, [], local="wanda", progress=False)
    with pytest.raises(VlmpruneError, match="input_ids"):
        prune_weights(model, [{"ids": 1}], progress=False)
    prune_weights(model, [], local="magnitude", progress=False)  # needs none


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEFAULT_ROOT", tmp_path / "missing")
    with pytest.raises(VlmpruneError, match="dataset-fashion-mnist.*evaluation set is never used"):
        scene_batches(build_tokenizer(["what"]), 4, seed=0)


def test_text_batches_are_a_deterministic_slice():
    tok = build_tokenizer(["the", "a", "of", "is", "to"])
    first, again = text_batches(tok, 10, seq_len=16, batch_size=4), text_batches(tok, 10, seq_len=16, batch_size=4)
    assert [b["input_ids"].shape for b in first] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))


# ----------------------------------------------------------------------------- CLI


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="needs the Debian dataset-fashion-mnist package")
def test_cli_prunes_a_testbed_checkpoint(testbed_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune-weights", "--model", str(testbed_dir), "--method", "uniform", "--local", "wanda", "--sparsity", "0.6",
            "--calib", "2", "--out", str(out)]
    assert main(args) == 0
    assert "pruned checkpoint" in capsys.readouterr().out
    report = json.loads((out / "sparsity.json").read_text())
    assert report["calibration_samples"] == 2 and report["overall"] == pytest.approx(0.6, abs=0.01)
    pm = vlmprune.load(out)
    weight = pm.model.get_submodule("model.language_model.layers.0.mlp.down_proj").weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert main(args) == 2  # the output exists now
    assert "--overwrite" in capsys.readouterr().err


def _save_causal_lm(path):
    from pydoc_data.topics import topics

    words = sorted({w for text in topics.values() for w in text.split()})[:300]
    tok = build_tokenizer(words)
    config = transformers.LlamaConfig(**dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_cli_ecoflap_and_owl_options_reach_the_report(tmp_path, capsys):
    _save_causal_lm(tmp_path / "lm")
    base = ["prune-weights", "--model", str(tmp_path / "lm"), "--local", "magnitude", "--sparsity", "0.6", "--calib", "2"]
    assert main(base + ["--method", "ecoflap", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "sparsity.json").read_text())
    assert (report["allocation"], report["zeroth_mode"], report["score"], report["cap"]) == ("released", "per-matrix", "grad", 0.1)
    assert main(base + ["--method", "ecoflap", "--allocation", "clamped", "--zeroth-mode", "block", "--score", "grad-weight",
                        "--cap", "0.05", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "sparsity.json").read_text())
    assert (report["allocation"], report["zeroth_mode"], report["score"], report["cap"]) == ("clamped", "block", "grad-weight", 0.05)
    assert all(0.55 - 1e-12 <= u["allocated"] <= 0.65 + 1e-12 for u in report["units"])
    assert main(base + ["--method", "owl", "--owl-lambda", "0.03", "--owl-m", "3", "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "sparsity.json").read_text())
    assert (report["owl_lambda"], report["owl_m"]) == (0.03, 3.0)
    shares = [u["allocated"] for u in report["units"]]
    assert max(shares) - min(shares) == pytest.approx(0.06)
    capsys.readouterr()
    for flag, value, message in [("--zeroth-mode", "joint", "zeroth_mode='joint'"), ("--allocation", "x", "allocation='x'"),
                                 ("--score", "w", "score='w'"), ("--owl-lambda", "-1", "owl_lambda=-1.0")]:
        assert main(base + ["--method", "ecoflap", flag, value, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_prunes_a_causal_lm_with_an_nm_pattern(tmp_path, capsys):
    _save_causal_lm(tmp_path / "lm")
    out = tmp_path / "out"
    assert main(["prune-weights", "--model", str(tmp_path / "lm"), "--local", "sparsegpt", "--nm", "2:4",
                 "--calib", "4", "--out", str(out)]) == 0
    report = json.loads((out / "sparsity.json").read_text())
    assert report["nm"] == "2:4" and report["overall"] == 0.5 and report["calibration_samples"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    weight = model.get_submodule("model.layers.3.self_attn.o_proj").weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    assert main(["prune-weights", "--model", str(tmp_path / "lm"), "--method", "owl", "--nm", "2:4", "--out", str(tmp_path / "x")]) == 2
    assert "method='uniform'" in capsys.readouterr().err
