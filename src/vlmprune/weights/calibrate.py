"""Block-by-block calibration: every block is calibrated on the outputs of the already-pruned blocks before it.

A model is a few **stacks** of blocks run in order: the vision tower's encoder blocks (VLMs), then the
language model's decoder layers. For each stack:

1. **capture**: run the model on each calibration batch far enough to call every block of the stack
   once (the adapter's vision pass for the tower, the base model's forward for the language model),
   with a ``with_kwargs`` forward pre-hook on every block that records how it is called: the hidden
   states reaching the first block, and each block's other arguments (attention mask, rotary
   embeddings, ``cu_seqlens``, ...), kept by reference. The forward runs to its end (no exception
   stops it), so every block's own arguments are the real ones, also where they differ per block
   (sliding-window masks).
2. for each block in order: hook an `InputStats` on each selected ``nn.Linear`` of the block, run the
   block on the captured inputs, hand the statistics to the caller (who prunes), then run the **pruned**
   block again: its outputs are the next block's inputs.

The tower is handled first, so its pruned outputs reach the language model's capture. Memory: the model,
the hidden states of the calibration batches at one block boundary, and one block's activations.
Nothing here copies transformers' forward code or assumes where tokens sit::

    linears = select_linears(model, find_stacks(model), patterns=["*mlp*"])
    for step in blockwise(model, batches, linears):
        for name, linear in step.linears.items():  # prune inside the loop body
            apply_mask(linear, wanda_mask(linear.weight, step.stats[name].norm, sparsity=0.5))
        # when the loop resumes, the pruned block computes the next block's inputs
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import VlmpruneError
from .local import InputStats

REGEX_PREFIX = "re:"  # a name pattern starting with this is a regular expression (re.search), else fnmatch-style


@dataclass(frozen=True)
class Stack:
    """One list of blocks that run one after another (``name``: "vision" or "language")."""

    name: str
    path: str  # module name of the block list, e.g. "model.language_model.layers"
    blocks: nn.ModuleList
    run: Callable[[Mapping], object] = field(repr=False)  # calls every block once on a batch


@dataclass
class BlockStep:
    """What `blockwise` hands over for one block: its selected linears (full module names) and their
    input statistics, and the block's inputs (one hidden-states tensor per calibration batch; the list
    is refilled in place with the block's outputs when the loop resumes, so copy what must outlive the step)."""

    stack: str
    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    stats: dict[str, InputStats]
    inputs: list[torch.Tensor]


@dataclass
class _Call:
    """How a block was called, less its hidden states: positional tail and keyword arguments."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool


# ----------------------------------------------------------------------------- model structure


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _adapter(model: nn.Module):
    """The vlmprune adapter of a supported VLM, or None for a plain causal LM."""
    from ..models import adapter_for, find_family

    return adapter_for(model) if find_family(getattr(model.config, "model_type", None)) is not None else None


def model_inputs(model: nn.Module, batch: Mapping) -> dict:
    """The batch as keyword inputs of the model's forward: without ``labels``, and with the token types
    a family's positions depend on when its adapter derives them (Qwen2-VL's ``mm_token_type_ids``)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    adapter = _adapter(model)
    if adapter is not None and hasattr(adapter, "token_types") and "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = adapter.token_types(inputs["input_ids"])
    return inputs


def find_stacks(model: nn.Module) -> list[Stack]:
    """The block stacks in the order they run: the vision tower's blocks (a registered family's
    ``Adapter.vision_blocks``), then the language model's decoder layers (``model.get_decoder().layers``)."""
    names = {id(m): n for n, m in model.named_modules()}
    stacks = []
    adapter = _adapter(model)
    if adapter is not None:
        vision_path = adapter.vision_blocks
        blocks = _module_at(model, vision_path)
        if not isinstance(blocks, nn.ModuleList):
            raise VlmpruneError(
                f"{type(model).__name__} has no vision blocks at {vision_path}; fix {type(adapter).__name__}.vision_blocks"
            )
        accepted = set(inspect.signature(adapter.prepare).parameters)
        stacks.append(Stack("vision", vision_path, blocks, lambda b: adapter.prepare(**{k: v for k, v in b.items() if k in accepted})))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or id(layers) not in names:
        raise VlmpruneError(
            f"{type(model).__name__} exposes no decoder layers (model.get_decoder().layers); weight pruning supports "
            "the vlmprune VLM families and decoder-only causal LMs such as LlamaForCausalLM"
        )
    base = model.base_model
    stacks.append(Stack("language", names[id(layers)], layers, lambda b: base(**model_inputs(model, b), use_cache=False)))
    return stacks


def _matcher(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str) or not pattern:
        raise VlmpruneError(f"a module-name pattern is a non-empty string, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise VlmpruneError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def select_linears(model: nn.Module, stacks: Sequence[Stack], patterns: str | Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside the stacks' blocks, by full module name, in model order.

    `patterns` (default: all of them) keeps those whose name matches any pattern: fnmatch-style
    (``"*.mlp.*"``, ``"model.language_model.layers.[0-3].*"``) or, prefixed with ``re:``, a regular
    expression searched in the name (``"re:layers\\.\\d+\\.self_attn"``). Each pattern must match at
    least one of them. Embeddings, projectors, mergers and the head sit outside the blocks and are
    never selected."""
    candidates: dict[str, nn.Linear] = {}
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    candidates[f"{stack.path}.{i}.{sub}"] = module
    if not candidates:
        raise VlmpruneError(f"{type(model).__name__} has no nn.Linear inside its blocks; nothing to prune")
    if patterns is None:
        return candidates
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise VlmpruneError("patterns is empty; leave it out (None) to prune every linear inside the blocks")
    matchers = [_matcher(p) for p in patterns]
    for pattern, match in zip(patterns, matchers):
        if not any(match(name) for name in candidates):
            names = list(candidates)
            examples = ", ".join(names[:3] + ["..."] + names[-2:]) if len(names) > 5 else ", ".join(names)
            raise VlmpruneError(
                f"pattern {pattern!r} matches no linear inside the blocks (embeddings and lm_head are never pruned); "
                f"names look like: {examples}"
            )
    return {name: m for name, m in candidates.items() if any(match(name) for match in matchers)}


# ----------------------------------------------------------------------------- capture and run


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, _Call]:
    if args:
        return args[0], _Call(tuple(args[1:]), dict(kwargs), False)
    if "hidden_states" not in kwargs:
        raise VlmpruneError("a block was called without hidden states (no positional input, no hidden_states=); cannot calibrate it")
    rest = dict(kwargs)
    return rest.pop("hidden_states"), _Call((), rest, True)


def capture_inputs(stack: Stack, batches: Sequence[Mapping]) -> tuple[list[torch.Tensor], list[list[_Call]], list[int]]:
    """Hidden states reaching the stack's first block, every block's call, and which batches they are
    (per batch that reaches the stack, in order; a batch without images does not reach the vision tower).

    Only the first block computes: the others hand their input hidden states on unchanged (in the
    first block's output form), so capturing costs about one block per batch instead of the whole
    stack. A block's other arguments (positions, masks, rotary tables) must not depend on the blocks
    before it; that is checked on the first batch against a real forward, and where they differ every
    batch runs the real forward, with a warning."""
    first: list[torch.Tensor] = []
    calls: list[list[_Call]] = [[] for _ in stack.blocks]
    reached: list[int] = []
    template: list = []  # the first block's output, whose form the skipped blocks give back

    def recorder(i: int):
        def hook(module, args, kwargs):
            hidden, call = _split_hidden(args, kwargs)
            if i == 0:
                first.append(hidden)
            calls[i].append(call)

        return hook

    def keep_output(module, args, output):
        template[:] = [output]

    def run(b: int, batch: Mapping, skip: bool) -> None:
        before = len(first)
        if skip:
            _hand_on(stack.blocks[1:], template)
        try:
            stack.run(batch)
        finally:
            unpatch_forward(stack.blocks[1:])
        counts = {len(c) - before for c in calls}
        if counts - {0, 1} or len(counts) > 1:
            raise VlmpruneError(
                f"calibration batch {b}: the {stack.name} blocks ran {sorted(counts)} times; block-by-block "
                "calibration needs every block called exactly once per forward"
            )

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(stack.blocks)]
    handles.append(stack.blocks[0].register_forward_hook(keep_output))
    try:
        with torch.no_grad():
            checked = len(stack.blocks) == 1  # one block: nothing to skip, nothing to check
            skip = not checked
            for b, batch in enumerate(batches):
                before = len(first)
                if checked:
                    run(b, batch, skip)
                    if len(first) > before:
                        reached.append(b)
                    continue
                run(b, batch, False)  # the first batch that reaches the stack runs for real once ...
                if len(first) == before:
                    continue
                reached.append(b)
                real = [c.pop() for c in calls]
                first.pop()
                run(b, batch, True)  # ... and again skipping, to compare the calls
                checked = True
                if not all(_same_call(r, c[-1]) for r, c in zip(real, calls)):
                    warnings.warn(f"the {stack.name} blocks' arguments depend on the blocks before them; capturing "
                                  "their inputs runs whole forwards (slower, same result)", stacklevel=2)
                    for c, r in zip(calls, real):
                        c[-1] = r
                    skip = False
    finally:
        for h in handles:
            h.remove()
    return first, calls, reached


def _hand_on(blocks: Sequence[nn.Module], template: list) -> None:
    """Patch `blocks` to return their input hidden states in the form of ``template[0]`` (the first
    block's output: a tensor, or a tuple whose first item is the hidden states)."""

    def forward(*args, **kwargs):
        hidden, _ = _split_hidden(args, kwargs)
        out = template[0] if template else hidden
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    for block in blocks:
        block.forward = forward


def unpatch_forward(blocks: Sequence[nn.Module]) -> None:
    """Give the blocks their own forward back (drop an instance attribute that patched it)."""
    for block in blocks:
        block.__dict__.pop("forward", None)


def _same_call(a: _Call, b: _Call) -> bool:
    """Whether two recorded calls hold the same arguments (tensors equal, other values ==)."""

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return x is y or x == y

    return a.hidden_as_kwarg == b.hidden_as_kwarg and same(a.args, b.args) and same(a.kwargs, b.kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    """Block `block` on `hidden`, called as the model called it (`call`: its other arguments)."""
    out = block(*call.args, **call.kwargs, hidden_states=hidden) if call.hidden_as_kwarg else block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _StatsDone(Exception):
    """Raised by the statistics hook of a block's last selected linear: the rest of the forward is unused."""


def input_statistics(
    block: nn.Module, found: Mapping[str, nn.Linear], stats: Mapping[str, InputStats], hidden: Sequence[torch.Tensor], calls: Sequence[_Call]
) -> None:
    """Feed each selected linear's inputs over every captured batch into its `stats`.

    The block's outputs are not needed here, so each forward stops as soon as the last selected linear
    has seen its input (before that linear computes: for a decoder layer whose last linear is the MLP's
    down projection, about a quarter of the block's work). That is exact only if every linear is called
    once per forward: the first batch runs the whole forward and counts the calls, and stopping is
    switched on only if each was called exactly once. Linears fed the very same tensor in a forward
    (q / k / v, gate / up) share one computation of its statistics (the Hessian's ``X^T X`` above all)."""
    seen: dict[str, int] = {}
    shared: dict[tuple, tuple] = {}  # (id(input), ...) -> (input, its moments), within one forward
    stop = False

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x, mine = args[0], stats[name]
            key = (id(x), None if mine.xtx is None else mine.xtx.dtype, mine.sq_sum.device)  # summed the same way
            hit = shared.get(key)
            if hit is None or hit[0] is not x or hit[1] != x._version:  # not the same, unchanged tensor
                hit = shared[key] = (x, x._version, mine.moments(x))
            mine.accumulate(hit[2])
            seen[name] = seen.get(name, 0) + 1
            if stop and len(seen) == len(found):
                raise _StatsDone

        return hook

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in found.items()]
    try:
        with torch.no_grad():
            for b, (x, call) in enumerate(zip(hidden, calls)):
                seen.clear()
                shared.clear()
                try:
                    run_block(block, x, call)
                except _StatsDone:
                    pass
                if b == 0:
                    stop = len(seen) == len(found) and all(n == 1 for n in seen.values())
    finally:
        shared.clear()  # drop the last forward's inputs
        for h in handles:
            h.remove()


def blockwise(
    model: nn.Module,
    batches: Sequence[Mapping],
    linears: Mapping[str, nn.Linear],
    hessian: bool = False,
    progress: bool = False,
) -> Iterator[BlockStep]:
    """Yield one `BlockStep` per block holding a selected linear, stack by stack (vision, then language).

    Each step's ``stats`` hold the selected linears' input statistics (``hessian=True`` for SparseGPT)
    on the block's inputs. Prune in the loop body: when the loop resumes, the block runs again, as it
    is now, to make the next block's inputs. A stack is captured only when its turn comes, after the
    stacks before it were pruned, and is left after its last block with a selected linear."""
    by_module = {id(m): name for name, m in linears.items()}
    stacks = find_stacks(model)
    for stack in stacks:
        chosen: dict[int, dict[str, nn.Linear]] = {}
        for i, block in enumerate(stack.blocks):
            found = {by_module[id(m)]: m for m in block.modules() if id(m) in by_module}
            if found:
                chosen[i] = found
        if not chosen:
            continue
        hidden, calls, _ = capture_inputs(stack, batches)
        if not hidden:
            raise VlmpruneError(
                f"no calibration batch reaches the {stack.name} blocks (e.g. no images for the vision tower); "
                "add such batches or leave those linears out with patterns"
            )
        last = max(chosen)
        bar = tqdm(range(last + 1), desc=f"calibrate {stack.name}", unit="block", disable=not progress, leave=False)
        for i in bar:
            block, found = stack.blocks[i], chosen.get(i, {})
            if found:
                stats = {name: InputStats(m.in_features, hessian=hessian, device=m.weight.device) for name, m in found.items()}
                input_statistics(block, found, stats, hidden, calls[i])
                yield BlockStep(stack.name, i, block, found, stats, hidden)
            if i < last:
                with torch.no_grad():  # the block as it is now (pruned) makes the next block's inputs,
                    for j, call in enumerate(calls[i]):  # in place: each batch's input goes as its output comes
                        hidden[j] = run_block(block, hidden[j], call)
        del hidden, calls


def dense_input_norms(model: nn.Module, batches: Sequence[Mapping], linears: Mapping[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Each linear's input column norms ``||X_j||_2`` over ordinary forwards of the model as it is (what
    OWL's outlier scores use): one forward per batch with a pre-hook on every linear, no block replay."""
    stats = {name: InputStats(m.in_features, device=m.weight.device) for name, m in linears.items()}
    handles = [m.register_forward_pre_hook(stats[name].hook) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:  # a VLM's tower runs inside its base model's forward
                model.base_model(**model_inputs(model, batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    empty = [name for name, s in stats.items() if s.n == 0]
    if empty:
        raise VlmpruneError(f"no calibration input reached {empty[0]} (and {len(empty) - 1} more); check the calibration batches")
    return {name: s.norm for name, s in stats.items()}
