"""Block-by-block calibration against ordinary full forwards of the model: the statistics collected block by
block equal plain hooks on one full forward; with pruning, each block's inputs equal a full forward of the
model pruned so far (pruned outputs feed the next block, the pruned tower feeds the language model)."""

import pytest
import torch
import transformers
from torch import nn

from conftest import TEXT, build_model, make_batch
from vlmprune.errors import VlmpruneError
from vlmprune.weights import apply_mask, blockwise, find_stacks, select_linears, wanda_mask

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "llama"]  # Qwen2.5-VL: windowed and full-attention vision blocks


def _model(family):
    if family == "llama":
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval()
    return build_model(family)


def _batches(family, model):
    """Two left-padded batches of two samples (different lengths) as model-input dicts."""
    if family == "llama":
        gen = torch.Generator().manual_seed(1)
        out = []
        for lengths in ([9, 6], [7, 11]):
            ids = torch.zeros(2, max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, n in enumerate(lengths):
                ids[b, -n:] = torch.randint(3, 200, (n,), generator=gen)
                mask[b, -n:] = 1
            out.append(dict(input_ids=ids, attention_mask=mask))
        return out
    return [make_batch(family, model, [3, 5], [4, 2], seed=0).kwargs(), make_batch(family, model, [2, 1], [3, 6], seed=1).kwargs()]


def _full_forward(model, family, batch):
    """The unmodified transformers forward, with Qwen's token types given explicitly."""
    kw = dict(batch)
    if family.startswith("qwen"):
        kw["mm_token_type_ids"] = (kw["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        model(**kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_statistics_equal_hooks_on_a_full_forward(family):
    model = _model(family)
    batches = _batches(family, model)
    linears = select_linears(model, find_stacks(model))
    ref_sq = {n: 0 for n in linears}
    ref_xtx = {n: 0 for n in linears}

    def record(name):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            ref_sq[name] = ref_sq[name] + x.square().sum(0)
            ref_xtx[name] = ref_xtx[name] + x.T @ x

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    for batch in batches:
        _full_forward(model, family, batch)
    for h in handles:
        h.remove()

    seen = []
    for step in blockwise(model, batches, linears, hessian=True):
        assert len(step.inputs) == len(batches)
        for name, stats in step.stats.items():
            seen.append(name)
            ref_norm = ref_sq[name].sqrt().float()
            torch.testing.assert_close(stats.norm, ref_norm, rtol=1e-5, atol=1e-5 * float(ref_norm.max()))
            ref_h = (2 / stats.n * ref_xtx[name]).float()
            torch.testing.assert_close(stats.hessian, ref_h, rtol=1e-4, atol=1e-5 * float(ref_h.abs().max()))
    assert seen == list(linears)  # every linear once, in model order
    stacks = [s.name for s in find_stacks(model)]
    assert stacks == (["language"] if family == "llama" else ["vision", "language"])


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_outputs_feed_the_next_block(family):
    model = _model(family)
    batches = _batches(family, model)
    linears = select_linears(model, find_stacks(model))
    stacks = {s.name: s for s in find_stacks(model)}
    checked = []
    for step in blockwise(model, batches, linears):
        # reference: a full forward of the model as pruned so far, recording this block's input
        block = stacks[step.stack].blocks[step.index]
        seen = []
        handle = block.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
        for batch in batches:
            _full_forward(model, family, batch)
        handle.remove()
        for got, ref in zip(step.inputs, seen, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        checked.append((step.stack, step.index))
        for name, linear in step.linears.items():
            apply_mask(linear, wanda_mask(linear.weight, step.stats[name].norm, sparsity=0.5))
    n_layers = TEXT["num_hidden_layers"]
    assert checked[-n_layers:] == [("language", i) for i in range(n_layers)]
    if family != "llama":
        assert checked[0] == ("vision", 0) and len(checked) == n_layers + 2  # the tower was pruned first
        assert all((m.weight == 0).float().mean() == 0.5 for m in linears.values())


def test_only_the_selected_blocks_are_visited():
    model = _model("llava")
    batches = _batches("llava", model)
    linears = select_linears(model, find_stacks(model), ["model.language_model.layers.[12].mlp.*"])
    assert list(linears) == [f"model.language_model.layers.{i}.mlp.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")]
    steps = [(s.stack, s.index, list(s.stats)) for s in blockwise(model, batches, linears)]
    assert [(s, i) for s, i, _ in steps] == [("language", 1), ("language", 2)]


def test_patterns_fnmatch_and_regex():
    model = _model("qwen2_vl")
    stacks = find_stacks(model)
    every = select_linears(model, stacks)
    assert all(isinstance(m, nn.Linear) for m in every.values())
    assert not any("merger" in n or "lm_head" in n or "embed" in n for n in every)
    attn = select_linears(model, stacks, "re:language_model\\.layers\\.\\d+\\.self_attn\\.[qkvo]_proj$")
    assert len(attn) == 4 * TEXT["num_hidden_layers"]
    vision = select_linears(model, stacks, ["model.visual.blocks.*"])
    assert len(vision) == 4 * 2 and all(n.startswith("model.visual.blocks.") for n in vision)


@pytest.mark.parametrize(
    "patterns, message",
    [
        (["lm_head"], "matches no linear inside the blocks"),
        (["*.mlp.*", "model.embed_tokens"], "'model.embed_tokens' matches no linear"),
        (["re:(unclosed"], "not a valid regular expression"),
        ([], "patterns is empty"),
    ],
)
def test_bad_patterns_are_refused(patterns, message):
    model = _model("llama")
    with pytest.raises(VlmpruneError, match=message.replace("(", "\\(").replace(".", "\\.")) as err:
        select_linears(model, find_stacks(model), patterns)
    if "matches no linear" in message:
        assert "model.layers.0.self_attn.q_proj" in str(err.value)  # names to pick from


def test_a_model_without_decoder_layers_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = transformers.PretrainedConfig()
    with pytest.raises(VlmpruneError, match="no decoder layers"):
        find_stacks(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_computes_only_the_first_block_and_records_the_real_calls(family, monkeypatch):
    """Capturing block inputs runs block 0 only (after one checked batch), and records what whole
    forwards record; if the check finds the calls differ, whole forwards run, with a warning."""
    from vlmprune.weights import calibrate

    model = _model(family)
    batches = _batches(family, model) * 2
    for stack in find_stacks(model):
        ran = [0] * len(stack.blocks)
        hooks = [next(iter(b.children())).register_forward_hook(lambda *a, i=i: ran.__setitem__(i, ran[i] + 1))
                 for i, b in enumerate(stack.blocks)]
        try:
            first, calls, _ = calibrate.capture_inputs(stack, batches)
            reached = len(first)
            assert ran[0] == reached + 1 and all(n == 1 for n in ran[1:])  # one real forward, for the check
            monkeypatch.setattr(calibrate, "_same_call", lambda a, b: False)
            with pytest.warns(UserWarning, match="runs whole forwards"):
                slow_first, slow_calls, _ = calibrate.capture_inputs(stack, batches)
            monkeypatch.undo()
        finally:
            for h in hooks:
                h.remove()
        assert all(torch.equal(a, b) for a, b in zip(first, slow_first))
        assert all(calibrate._same_call(a, b) for ca, cb in zip(calls, slow_calls) for a, b in zip(ca, cb))


class _Shared(torch.nn.Module):
    """A block whose `a` runs twice per forward (shared weights), then `b`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class _Fork(torch.nn.Module):
    """Two linears fed the very same tensor (as q / k / v), then a third."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.c(self.a(x) * self.b(x))


@pytest.mark.parametrize("kind", ["chain", "shared", "fork"])
def test_input_statistics_equal_whole_forwards_and_stop_early_only_when_safe(kind):
    """Against InputStats fed by plain hooks over whole forwards: the same statistics (Hessians too),
    while the last linear computes only in the first, counting forward unless a linear runs twice."""
    from vlmprune.weights import calibrate
    from vlmprune.weights.local import InputStats

    torch.manual_seed(0)
    block = {"chain": lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)),
             "shared": _Shared, "fork": _Fork}[kind]()
    found = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden = [torch.randn(2, 5, 4) for _ in range(3)]
    calls = [calibrate._Call((), {}, False)] * 3
    ran, ref = [], {n: InputStats(m.in_features, hessian=True) for n, m in found.items()}
    handles = [m.register_forward_pre_hook(ref[n].hook) for n, m in found.items()]
    with torch.no_grad():
        for x in hidden:
            block(x)
    for h in handles:
        h.remove()
    stats = {n: InputStats(m.in_features, hessian=True) for n, m in found.items()}
    handle = list(found.values())[-1].register_forward_hook(lambda *a: ran.append(1))
    calibrate.input_statistics(block, found, stats, hidden, calls)
    handle.remove()
    assert len(ran) == (3 if kind == "shared" else 1)
    for n in found:
        assert stats[n].n == ref[n].n
        torch.testing.assert_close(stats[n].norm, ref[n].norm)
        torch.testing.assert_close(stats[n].hessian, ref[n].hessian)
