"""PAR: the router, its plans, candidate flows and KL, the self-supervised trainer and its checkpoints."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vlmprune
from conftest import make_batch, sample_inputs
from vlmprune.methods.par import PAR, PARLayers, PARTokens, Router, RouterConfig, RouterTrainConfig, save_router, train_router
from vlmprune.methods.par.flows import NOISE_SCALES, candidate_masks, flow_kl, plan_from_masks, repeat_prepared, stratified_scores, teacher_pass, top_mask
from vlmprune.methods.par.router import RouterOutput
from vlmprune.methods.par.train import preference_loss, selection_gap


def _router_dir(tmp_path, pm, seed=0, **overrides):
    torch.manual_seed(seed)
    router = Router(RouterConfig.for_model(pm, **overrides))
    with torch.no_grad():  # spread the scores so the top-k is well defined
        router.token_head.weight.normal_(0, 1.0)
        router.layer_head.weight.normal_(0, 1.0)
    return save_router(router, tmp_path / "router"), router


def _balanced_reference(logits: list[float], grid, k: int) -> set[int]:
    """Brute force: the k tokens kept. Cut the grid into the h x w rectangles (w in {h, h + 1}, at
    least two tokens while k < n) whose count is closest to k, fewer on ties (or the sequence into such
    runs); if k is below the number of tiles, choose tiles by the same rule applied to their best
    logits over the grid of tiles and keep each chosen tile's best token; otherwise take rounds of
    each tile's next-best token, best first. Above half the tokens, keep all but the n - k tokens the
    same rule picks from the negated logits (every tile's worst token dropped first)."""
    n = len(logits)
    if n < 2 * k < 2 * n:
        return set(range(n)) - _balanced_reference([-x for x in logits], grid, n - k)
    least = 2 if k < n else 1
    if grid is not None and grid[0] * grid[1] == n:
        def cut(shape):
            high, wide = shape
            across = -(-grid[1] // wide)
            return [i // grid[1] // high * across + i % grid[1] // wide for i in range(n)], (-(-grid[0] // high), across)
        shapes = [(h, w) for h in range(1, grid[0] + 1) for w in (h, h + 1) if h * w >= least]
        tile_of, tile_grid = cut(min(shapes, key=lambda s: (abs(len(set(cut(s)[0])) - k), len(set(cut(s)[0])))))
    else:
        run = min(range(least, n + 1), key=lambda r: (abs(len({i // r for i in range(n)}) - k), len({i // r for i in range(n)})))
        tile_of, tile_grid = [i // run for i in range(n)], None
    m = max(tile_of) + 1
    ranked = [sorted((i for i in range(n) if tile_of[i] == t), key=lambda i: -logits[i]) for t in range(m)]
    if k < m:
        return {ranked[t][0] for t in _balanced_reference([logits[r[0]] for r in ranked], tile_grid, k)}
    order: list[int] = []
    for r in range(max(len(m) for m in ranked)):
        order += sorted((m[r] for m in ranked if len(m) > r), key=lambda i: -logits[i])
    return set(order[:k])


def test_balanced_selection_keeps_each_tiles_best_token_first():
    gen = torch.Generator().manual_seed(0)
    cases = [((4, 4), 16, 4), ((12, 12), 144, 36), ((12, 12), 144, 16), ((12, 12), 144, 72), ((12, 12), 144, 86),
             ((12, 12), 144, 120), ((12, 12), 144, 69), ((12, 12), 144, 27), ((12, 12), 144, 38), ((12, 12), 144, 60), ((12, 12), 144, 3), ((24, 24), 576, 50), (None, 50, 7), ((6, 8), 48, 10), (None, 20, 6), (None, 20, 13), ((3, 5), 15, 15)]
    for grid, n, k in cases:
        logits = torch.randn(1, n, generator=gen)
        out = RouterOutput(logits, torch.zeros(1, 3), [n], [grid])
        chosen = set(out.selection_scores(torch.tensor([k]))[0].topk(k).indices.tolist())
        assert chosen == _balanced_reference(logits[0].tolist(), grid, k)
    # a ragged batch, scored in groups of equal count, grid and budget: each sample as the brute force
    batch = [((12, 12), 144, 36), ((12, 12), 144, 36), ((12, 12), 144, 100), (None, 50, 7), ((12, 12), 144, 36), (None, 50, 7), ((6, 8), 48, 10)]
    logits = torch.full((len(batch), 144), float("-inf"))
    for b, (_, n, _) in enumerate(batch):
        logits[b, :n] = torch.randn(n, generator=gen)
    keep = torch.tensor([k for *_, k in batch])
    scores = RouterOutput(logits, torch.zeros(len(batch), 3), [n for _, n, _ in batch], [g for g, *_ in batch]).selection_scores(keep)
    for b, (grid, n, k) in enumerate(batch):
        assert bool(scores[b, n:].isneginf().all())
        assert set(scores[b, :n].topk(k).indices.tolist()) == _balanced_reference(logits[b, :n].tolist(), grid, k)
    # a 4x4 grid and 4 tokens: one per 2x2 quadrant; the plain router keeps its top 4 wherever they are
    logits = torch.zeros(1, 16)
    logits[0, [0, 1, 4, 5]] = 5.0  # the four best all in the top-left quadrant
    balanced = RouterOutput(logits, torch.zeros(1, 3), [16], [(4, 4)])
    quadrants = {(i // 4 // 2, i % 4 // 2) for i in balanced.selection_scores(torch.tensor([4]))[0].topk(4).indices.tolist()}
    assert len(quadrants) == 4
    plain = RouterOutput(logits, torch.zeros(1, 3), [16], [(4, 4)], balanced=False)
    assert set(plain.selection_scores(torch.tensor([4]))[0].topk(4).indices.tolist()) == {0, 1, 4, 5}
    # stratified random samples cover every tile, and differ from draw to draw
    draws = top_mask(stratified_scores([144] * 2, [(12, 12)] * 2, torch.tensor([36, 36]), gen, 144), torch.tensor([36, 36]))
    for row in draws:
        assert len({(i // 12 // 2, i % 12 // 2) for i in row.nonzero().squeeze(1).tolist()}) == 36
    assert not torch.equal(draws[0], draws[1])
    # above half the tokens, tiles still spread them: keeping 72 of 144 keeps one of every 1x2 pair
    half = top_mask(stratified_scores([144], [(12, 12)], torch.tensor([72]), gen, 144), torch.tensor([72]))[0]
    assert half.view(72, 2).sum(1).eq(1).all()
    # just under half: 1x2 tiles (72, closest to 69), so no pair keeps both and only three keep none
    # (wide 1x3 tiles would let a positional preference empty whole columns)
    under = top_mask(stratified_scores([144], [(12, 12)], torch.tensor([69]), gen, 144), torch.tensor([69]))[0]
    assert under.view(72, 2).sum(1).le(1).all() and under.view(72, 2).sum(1).eq(1).sum() == 69
    # 60 of 144 with a router that prefers the top of the image: 72 tiles of 1x2, and the 12 tiles
    # left out are spread over the tile grid (every two rows of the image keep 10 tokens), where
    # taking the best 60 tiles would empty the two bottom rows
    prior = -torch.arange(144, dtype=torch.float32).div(12, rounding_mode="floor")[None]
    top = top_mask(RouterOutput(prior, torch.zeros(1, 3), [144], [(12, 12)]).selection_scores(torch.tensor([60])), torch.tensor([60]))[0]
    assert top.view(72, 2).sum(1).le(1).all() and top.view(6, 24).sum(1).eq(10).all()
    # above half: 100 of 144 drops 44, the router's worst token of each of 44 tiles (closest count
    # for 44 in a 12 x 12 grid: 2 x 2 tiles, 36; then 8 more), so no 2 x 2 quadrant loses more than two
    low = top_mask(RouterOutput(prior, torch.zeros(1, 3), [144], [(12, 12)]).selection_scores(torch.tensor([100])), torch.tensor([100]))[0]
    lost = (~low).view(6, 2, 6, 2).sum((1, 3))
    assert lost.ge(1).all() and lost.le(2).all() and lost.sum() == 44
    # 38 of 144: 2x2 tiles (36) rather than 1x3 (48), so every 2x2 quadrant keeps a token
    quads = top_mask(stratified_scores([144], [(12, 12)], torch.tensor([38]), gen, 144), torch.tensor([38]))[0]
    assert len({(i // 12 // 2, i % 12 // 2) for i in quads.nonzero().squeeze(1).tolist()}) == 36


def test_selection_gap_is_the_bernoulli_log_likelihood_difference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, generator=gen)
    win = top_mask(torch.randn(5, 12, generator=gen), torch.full((5,), 4))
    lose = top_mask(torch.randn(5, 12, generator=gen), torch.full((5,), 4))

    def loglik(mask):
        return (mask * torch.nn.functional.logsigmoid(logits) + (~mask) * torch.nn.functional.logsigmoid(-logits)).sum(-1)

    swapped = (win ^ lose).sum(-1) / 2
    expected = (loglik(win) - loglik(lose)) / swapped.clamp(min=1)
    torch.testing.assert_close(selection_gap(logits, win, lose), expected)
    assert top_mask(torch.tensor([[0.1, 3.0, -1.0, 2.0]]), torch.tensor([2])).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("balanced", [True, False])
def test_par_plan_is_the_routers_selection_and_runs_physically(tiny_models, family, balanced, tmp_path):
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [3, 6], [4, 2], "left")
    path, router = _router_dir(tmp_path, pm, balanced=balanced)
    par = PAR.load(path, tokens=0.25, layers=0.5)
    prep = pm.prepare(**batch.kwargs())
    with torch.no_grad():
        scores = router(prep, 0.25, 0.5)
    out = pm(**batch.kwargs(), prune=par)
    plan = out.stats.plan
    for b, n in enumerate(batch.n_visual):
        k = max(1, round(0.25 * n))
        logits = scores.token_logits[b, :n]
        expected = _balanced_reference(logits.tolist(), prep.visual_grids[b], k) if balanced else set(logits.topk(k).indices.tolist())
        assert set(plan.keep[0][b].tolist()) == expected
        assert int(out.stats.visual_tokens[b, 0]) == k  # the dropped tokens left the sequence
        skipped = set(scores.layer_logits[b].topk(3, largest=False).indices.tolist())
        assert set(plan.skip.sets[b]) == skipped
        assert not out.stats.layers_run[b, sorted(skipped)].any() and int(out.stats.layers_run[b].sum()) == 3
    # token-only and layer-only versions of the same router
    tok = pm(**batch.kwargs(), prune=PAR.load(path, tokens=0.5, layers=1))
    assert isinstance(PAR.load(path, tokens=0.5, layers=1), PARTokens) and tok.stats.layers_run.all()
    lay = pm(**batch.kwargs(), prune=PAR.load(path, tokens=1, layers=0.5))
    assert lay.stats.visual_tokens[:, -1].tolist() == batch.n_visual and lay.stats.layers_run.sum(1).tolist() == [3, 3]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_router_at_layer_k_reads_layer_ks_hidden_states_of_the_unmodified_model(tiny_models, family, tmp_path):
    """At K = 2 the router scores the input of layer 2 (the unmodified model's hidden_states[2]); its
    tokens leave from layer 2 on, and it skips only layers >= 2."""
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [4], [3])
    path, router = _router_dir(tmp_path, pm, seed=2, token_layer=2)
    with torch.no_grad():
        hidden = model(**batch.hf_kwargs(family), output_hidden_states=True).hidden_states[2]
    prep = pm.prepare(**batch.kwargs())
    from dataclasses import replace

    with torch.no_grad():
        scores = router(replace(prep, inputs_embeds=hidden), 0.25, 0.5)
    out = pm(**batch.kwargs(), prune=PAR.load(path, tokens=0.25, layers=0.5))
    plan, n = out.stats.plan, batch.n_visual[0]
    k = max(1, round(0.25 * n))
    assert list(plan.keep) == [2]
    assert set(plan.keep[2][0].tolist()) == _balanced_reference(scores.token_logits[0, :n].tolist(), prep.visual_grids[0], k)
    assert set(plan.skip.sets[0]) == {int(i) + 2 for i in scores.layer_logits[0, 2:].topk(3, largest=False).indices}
    assert out.stats.visual_tokens[0, :2].tolist() == [n, n] and int(out.stats.visual_tokens[0, -1]) == k
    assert out.stats.layers_run[0, :2].all() and int(out.stats.layers_run[0].sum()) == 3
    with pytest.raises(vlmprune.VlmpruneError, match="layers 0..1 always run"):
        pm(**batch.kwargs(), prune=PARLayers(router=str(path), keep_layers=1))
    # composed with a method that drops tokens before K, the router cannot read every token
    with pytest.raises(vlmprune.VlmpruneError, match="reads every token at layer 2"):
        pm(**batch.kwargs(), prune=[vlmprune.Random(keep=0.5), PARTokens(router=str(path), keep=0.25)])


@pytest.mark.parametrize("token_layer", [0, 2])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_par_batch_equals_alone_and_holds_through_decoding(tiny_models, family, token_layer, tmp_path):
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [2, 7], [5, 1], "left", seed=3)
    path, _ = _router_dir(tmp_path, pm, seed=1, token_layer=token_layer)
    par = PAR.load(path, tokens=0.25, layers=0.67)
    together = pm.generate(**batch.kwargs(), prune=par, max_new_tokens=5, return_dict=True)
    for b in range(2):
        alone_inputs = sample_inputs(family, batch, b)
        alone = pm.generate(**alone_inputs.kwargs(), prune=par, max_new_tokens=5, return_dict=True)
        assert together.sequences[b, -5:].tolist() == alone.sequences[0, -5:].tolist()
        for step in range(5):
            torch.testing.assert_close(together.scores[step][b], alone.scores[step][0], atol=2e-4, rtol=1e-4)
    # every decode step kept the prefill's decision: skipped layers cache nothing, others hold the kept tokens
    stats = together.stats
    for b in range(2):
        skipped = sorted(stats.plan.skip.sets[b])
        assert skipped and (stats.kv_entries[b, skipped] == 0).all()
        ran = [i for i in range(pm.n_layers) if i not in skipped]
        n_text = int(batch.attention_mask[b].sum()) - batch.n_visual[b]
        kept = max(1, round(0.25 * batch.n_visual[b]))
        # the prompt's text, the visual tokens present (all before K, the kept ones from K on) and the
        # 4 decoded tokens fed back (the 5th is not)
        assert min(skipped) >= token_layer
        for i in ran:
            assert int(stats.kv_entries[b, i]) == n_text + (kept if i >= token_layer else batch.n_visual[b]) + 4


def test_router_flops_are_counted_and_priced(tiny_models, tmp_path):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3], [4])
    path, router = _router_dir(tmp_path, pm)
    prep = pm.prepare(**batch.kwargs())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as counted matmuls
        router(prep, 0.25, 0.5)
    measured = counter.get_total_flops() / 2
    assert abs(float(router.macs(prep)[0]) - measured) / measured < 0.03
    out = pm(**batch.kwargs(), prune=PAR.load(path, tokens=0.25, layers=0.5))
    report = vlmprune.flops(pm, out.stats)
    assert float(report.scoring[0]) == pytest.approx(2 * float(router.macs(prep)[0]))
    budgeted = vlmprune.AtFlops(PAR.load(path, tokens=0.25, layers=0.5), share=0.5).resolve(pm, prep)
    run = pm(**batch.kwargs(), prune=budgeted.method)
    assert vlmprune.flops(pm, run.stats).batch_share == pytest.approx(budgeted.share)


@pytest.mark.parametrize("token_layer", [0, 1])
def test_par_prices_itself_as_its_runs_cost(tiny_models, tmp_path, monkeypatch, token_layer):
    """`lm_counts` (what AtFlops prices) equals the accounting of the real run, for every version, with
    no routing pass (from the token layer K on every layer sees the same tokens, and only those layers
    can be skipped, so the cost does not depend on which tokens or layers are picked)."""
    from vlmprune.eval.flops import LMCounts, lm_share

    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3, 1, 6], [4, 7, 2])
    path, _ = _router_dir(tmp_path, pm, token_layer=token_layer)
    prep = pm.prepare(**batch.kwargs())
    passes, forward = [], Router.forward
    monkeypatch.setattr(Router, "forward", lambda *args: passes.append(1) or forward(*args))
    for method in (PAR(router=str(path), keep=0.3, layers=0.5), PARTokens(router=str(path), keep=5), PARLayers(router=str(path), keep_layers=1)):
        passes.clear()
        counts = method.lm_counts(pm, prep)
        routed = len(passes)
        run = pm(**batch.kwargs(), prune=method)
        actual = LMCounts.from_stats(run.stats)
        assert torch.equal(counts.macs(pm.adapter.text_config)["layers"], actual.macs(pm.adapter.text_config)["layers"])
        assert lm_share(pm.adapter.text_config, counts) == pytest.approx(vlmprune.flops(pm, run.stats).batch_share)
        assert routed == 0


def test_flow_kl_matches_separate_runs(tiny_models):
    model = tiny_models("llava")
    pm = vlmprune.wrap(model)
    batch = make_batch("llava", model, [3, 5], [4, 2], "left")
    prep = pm.prepare(**batch.kwargs())
    teacher = teacher_pass(pm, prep)
    torch.testing.assert_close(teacher.log_probs[:, 0], pm(**batch.kwargs()).last_logits.log_softmax(-1))
    gen = torch.Generator().manual_seed(0)
    logits, layer_logits = torch.randn(2, 16, generator=gen), torch.randn(2, 6, generator=gen)
    routed = RouterOutput(logits, layer_logits, [16, 16], prep.visual_grids)
    tokens, layers = candidate_masks(teacher, routed, torch.tensor([4, 8]), torch.tensor([4, 5]), 1, gen, stratified=2, layer_flows=2)
    c = tokens.shape[1]
    assert c == len(NOISE_SCALES) + 1 + 1 + 2 + 2
    assert tokens.sum(-1)[0].eq(4).all() and tokens.sum(-1)[1].eq(8).all() and layers.sum(-1)[1].eq(5).all()
    # layer explorations keep the router's own tokens and its top-k of its logits is the router flow
    own = len(NOISE_SCALES)
    assert tokens[:, -2:].eq(tokens[:, own : own + 1]).all()
    assert torch.equal(layers[:, own], top_mask(layer_logits, torch.tensor([4, 5])))
    plan = plan_from_masks(tokens.flatten(0, 1), layers.flatten(0, 1), 0)
    kl = flow_kl(pm, repeat_prepared(prep, c), plan, teacher.log_probs.repeat_interleave(c, 0)).view(2, c)
    for b in range(2):
        for j in (0, c - 1):
            single = vlmprune.Plan(keep={0: [tokens[b, j].nonzero().squeeze(1)]}, skip=[(~layers[b, j]).nonzero().squeeze(1).tolist()])
            alone = sample_inputs("llava", batch, b)
            pruned = pm(**alone.kwargs(), prune=single).last_logits.log_softmax(-1)[0]
            expected = (teacher.log_probs[b].exp() * (teacher.log_probs[b] - pruned)).sum()
            assert float(kl[b, j]) == pytest.approx(float(expected), abs=1e-4)
    empty = vlmprune.Plan(keep={0: [torch.arange(n) for n in batch.n_visual]})
    assert flow_kl(pm, prep, empty, teacher.log_probs).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_router_trains_and_its_loss_falls_on_a_fixed_batch(tiny_models, family, tmp_path):
    model = tiny_models(family)
    pm = vlmprune.wrap(model)
    batch = make_batch(family, model, [3, 6], [4, 2], "left")
    prep = pm.prepare(**batch.kwargs())
    teacher = teacher_pass(pm, prep)
    torch.manual_seed(0)
    router = Router(RouterConfig.for_model(pm))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = router(prep, 0.25, 0.5)
    keep = torch.tensor([max(1, round(0.25 * n)) for n in batch.n_visual])
    tokens, layers = candidate_masks(teacher, first, keep, torch.tensor([3, 3]), 2, gen, stratified=2)
    c = tokens.shape[1]
    plan = plan_from_masks(tokens.flatten(0, 1), layers.flatten(0, 1), 0)
    kl = flow_kl(pm, repeat_prepared(prep, c), plan, teacher.log_probs.repeat_interleave(c, 0)).view(2, c)
    opt = torch.optim.AdamW(router.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = router(prep, 0.25, 0.5)
        loss = preference_loss(out.token_logits, out.layer_logits, tokens, layers, kl, beta=2.0, margin=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]

    # the whole trainer: a few steps, saved, resumable, and its router gives valid plans
    cfg = RouterTrainConfig(out=str(tmp_path / "par"), steps=4, batch_size=2, save_every=2, log_every=2)
    assert train_router(cfg, pm=pm, progress=False, stop_after=2, batches=[batch.kwargs()]) is None
    record = train_router(cfg, pm=pm, progress=False, batches=[batch.kwargs()])
    assert [e["step"] for e in record["log"]] == [2, 4]
    info = json.loads((tmp_path / "par" / "router.json").read_text())
    assert info["config"]["n_layers"] == 6 and info["train"]["steps"] == 4
    out = pm(**batch.kwargs(), prune=PAR.load(tmp_path / "par", tokens=0.5, layers=0.5))
    out.stats.plan.validate(6, batch.n_visual)
    assert out.stats.layers_run.sum(1).tolist() == [3, 3]


def test_par_bad_inputs(tiny_models, tmp_path):
    llava, qwen = vlmprune.wrap(tiny_models("llava")), vlmprune.wrap(tiny_models("qwen2_vl"))
    batch = make_batch("qwen2_vl", qwen.model, [3], [4])
    path, _ = _router_dir(tmp_path, llava)
    with pytest.raises(vlmprune.VlmpruneError, match="trained for a llava model"):
        qwen(**batch.kwargs(), prune=PAR.load(path))
    for bad in (0, 1.5, -0.2):
        with pytest.raises(vlmprune.VlmpruneError, match=r"outside \(0, 1\]"):
            PAR.load(path, tokens=0.25, layers=bad)
    with pytest.raises(vlmprune.VlmpruneError, match=r"outside \(0, 1\]"):
        PAR(router=str(path), keep=1.5)
    with pytest.raises(vlmprune.VlmpruneError, match="is not a PAR router"):
        PAR.load(tmp_path / "nowhere")
    (path / "router.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(vlmprune.VlmpruneError, match="corrupt"):
        PAR.load(path)
    (path / "router.json").write_text("{broken")
    with pytest.raises(vlmprune.VlmpruneError, match="corrupt"):
        PAR.load(path)
    with pytest.raises(vlmprune.VlmpruneError, match="needs a trained router"):
        llava(**make_batch("llava", llava.model, [3], [4]).kwargs(), prune=PARLayers(router=None, keep_layers=3))
    with pytest.raises(vlmprune.VlmpruneError, match=r"--tokens 0 is outside"):
        RouterTrainConfig(out="x", tokens=0)



def test_router_cli_trains_on_the_testbed_and_serves_eval(tmp_path, capsys):
    from vlmprune.cli import main
    from vlmprune.testbed import data

    if not data.DEFAULT_ROOT.exists():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    out = tmp_path / "router"
    assert main(["router", "train", "--out", str(out), "--steps", "2", "--batch-size", "2"]) == 0
    assert "router:" in capsys.readouterr().out
    assert main(["router", "train", "--out", str(out), "--steps", "2"]) == 2  # refuses to overwrite
    assert "already holds a trained router" in capsys.readouterr().err
    assert main(["eval", "--method", "par", "--router", str(out), "--keep", "0.25", "--layers", "0.67", "--limit", "8"]) == 0
    assert "visual tokens 144 -> 36.0, layers run 4.00" in capsys.readouterr().out  # all 144 enter, 36 from layer 1 on
    assert main(["eval", "--method", "par-layers", "--router", str(out), "--flops", "0.5", "--limit", "8"]) == 0
    assert "layers run 3.00" in capsys.readouterr().out
    # with no --router, the router shipped for the testbed (token layer 1: every token in layer 0)
    assert main(["eval", "--method", "par-tokens", "--keep", "0.25", "--limit", "8"]) == 0
    assert "visual tokens 144 -> 36.0, layers run 6.00" in capsys.readouterr().out
    assert PAR.load().router == PAR.load("testbed").router and PAR().router == "testbed"
