"""What every model family must answer, as small accessors over the unmodified transformers model.

An adapter turns images + text into input embeddings and positions (`prepare`), names the decoder
pieces (`DecoderLayout`), computes rotary embeddings for any subset of original positions, and gives
cheap attention-score rows for a few queries. Visual tokens are found at run time from
``input_ids == image_token_id``; nothing depends on where they sit.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import VlmpruneError
from .vision_cost import VisionCost

SUPPORTED_ATTENTION = ("sdpa", "eager")


# ----------------------------------------------------------------------------- where modules compute
def _align_hooks(module: nn.Module) -> list:
    """accelerate's `AlignDevicesHook`s on `module` (one, or several inside a `SequentialHook`)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", (hook,)) if hasattr(h, "execution_device") and hasattr(h, "offload")]


def offload_hook(module: nn.Module):
    """The accelerate hook that loads `module`'s offloaded (CPU or disk) weights at its forward, or None."""
    return next((h for h in _align_hooks(module) if h.offload), None)


def execution_device(module: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """Where `module` computes: its accelerate hook's ``execution_device`` (a dispatched or offloaded
    module), else the device of its first parameter or buffer that is not on the meta device, else the
    execution device of a hooked submodule, else `default`."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return _indexed(hook.execution_device)
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    for sub in module.modules():
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                return _indexed(hook.execution_device)
    return default


def _indexed(device) -> torch.device:
    """A device as tensors report it: ``cuda`` -> ``cuda:<current>``, a GPU index -> ``cuda:<index>``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def onloaded(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the weights of `modules` (and their submodules) are real tensors on their
    execution devices, also where accelerate offloaded them to the CPU or disk (outside a hooked
    module's forward they are on the meta device): read ``.weight`` or call submodules directly.

    Each offloaded module's hook loads its weights once on entry and drops them on exit; in between
    the hook leaves the weights alone (it still moves a direct call's inputs to the module's device).
    Without offloading this does nothing. Every direct use of the model's weights outside a forward of
    the whole module (attention-score rows, vision scores) goes through here."""
    hooked, seen = [], set()
    for module in modules:
        for sub in module.modules():
            hook = offload_hook(sub)
            if hook is not None and id(sub) not in seen:
                seen.add(id(sub))
                hooked.append((sub, hook))
    if not hooked:
        yield
        return
    loaded = []
    try:
        for sub, hook in hooked:
            hook.pre_forward(sub)
            hook.offload = False  # a call inside the block must not reload (or drop) the weights
            loaded.append((sub, hook))
        yield
    finally:
        for sub, hook in reversed(loaded):
            hook.offload = True
            hook.post_forward(sub, None)


@dataclass(frozen=True)
class Placement:
    """Where the language model computes. ``input``: the embedding's device, where the engine keeps
    its bookkeeping (positions, masks, counters, logits); ``layers``: each decoder layer's; ``norm``,
    ``head``, ``rotary``: the final norm's, the LM head's and the rotary embedding's."""

    input: torch.device
    layers: tuple[torch.device, ...]
    norm: torch.device
    head: torch.device
    rotary: torch.device

    @property
    def split(self) -> bool:
        """True when some part computes away from the input device."""
        return any(d != self.input for d in (*self.layers, self.norm, self.head, self.rotary))


@dataclass(frozen=True)
class DecoderLayout:
    """The modules of the language model that the engine drives."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module

    @property
    def n_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class VisionScores:
    """What the vision tower saw of each visual token, for methods that decide before the LLM (VisionZip).

    One tensor per sample, indexed like ``Plan.keep`` (the sample's ``input_ids == image_token_id``
    positions, in order):

    * ``dominance [n] float32``: how much the tower attends to the token. LLaVA / LLaVA-NeXT (CLIP):
      the attention the CLS token pays to the token's patch in the layer that produces the features
      ``vision_feature_layer`` selects, mean over heads. Qwen2-VL / Qwen2.5-VL (no CLS): the mean
      attention the patch receives in the last vision block (over heads and every query of its
      attention segment), averaged over the patches merged into the token.
    * ``keys [n, d] float32``: that layer's keys for the token, mean over heads (Qwen: before the
      rotary embedding, averaged over the merged patches).
    * ``patch [n] bool``: False for tokens with no patch in the tower (LLaVA-NeXT's image-newline
      tokens); their dominance, keys and features are 0.
    * ``features [n, f] float32``: the tower's features of the token as its projector takes them (a
      recorded reference, nothing recomputed). LLaVA / LLaVA-NeXT: the input of ``multi_modal_projector``
      (the hidden state ``vision_feature_layer`` selects; several layers concatenated). Qwen2-VL /
      Qwen2.5-VL: the input of the merger, the ``spatial_merge_size**2`` patches of the token
      concatenated as the merger takes them (before its norm).
    """

    dominance: list[torch.Tensor]
    keys: list[torch.Tensor]
    patch: list[torch.Tensor]
    features: list[torch.Tensor]


# per visual token of the whole batch, in order: (dominance [N], keys [N, d], patch [N] bool, features [N, f])
VisionRecord = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class PreparedInputs:
    """A batch ready for the decoder: embeddings, positions and which tokens are real or visual.

    Positions always carry an axis dimension ``A``: 1 for 1-D RoPE, 3 for mRoPE (temporal, height,
    width). They come from the attention mask (as transformers' ``generate`` does), so a sample's
    positions do not depend on how much padding the batch added.
    """

    input_ids: torch.Tensor  # [B, L]
    inputs_embeds: torch.Tensor  # [B, L, D]
    position_ids: torch.Tensor  # [A, B, L]
    attention_mask: torch.Tensor  # [B, L] bool, True = real token
    visual_mask: torch.Tensor  # [B, L] bool, True = visual token
    visual_grids: list | None = None  # per sample (rows, cols) of its visual tokens, or None if not one grid
    # the vision pass's record of one tower layer's input; `vision_scores()` computes from it on demand
    vision_record: VisionRecord | None = field(default=None, repr=False)
    # the image inputs `prepare` was given (pixel_values and image_sizes / image_grid_thw; references):
    # the geometry that prices the vision side (`eval.flops.vision_score_macs`)
    image_inputs: dict = field(default_factory=dict, repr=False)

    @property
    def n_visual(self) -> list[int]:
        return self.visual_mask.sum(1).tolist()

    def vision_scores(self) -> VisionScores:
        """Per visual token, the vision tower's attention, keys and features (see `VisionScores`).

        Computed when called, from the input of one tower layer that `prepare`'s vision pass recorded
        (a reference, no copy): one q/k projection of that layer, no second vision pass, and the tower
        keeps its attention implementation. Each call computes afresh; its multiply-adds per sample are
        `eval.flops.vision_score_macs` (a method that calls it states them in ``Plan.overhead``).
        """
        counts = self.n_visual
        if self.vision_record is None:
            if sum(counts):
                raise VlmpruneError(
                    "these inputs carry no record of the vision pass; build them with the adapter's prepare"
                )
            empty = [torch.zeros(0) for _ in counts]
            return VisionScores(empty, [torch.zeros(0, 0) for _ in counts], [e.bool() for e in empty],
                                [torch.zeros(0, 0) for _ in counts])
        dominance, keys, patch, features = self.vision_record()
        if dominance.shape[0] != sum(counts):
            raise VlmpruneError(
                f"the vision record has {dominance.shape[0]} tokens but the prompt has {sum(counts)} image placeholders"
            )
        return VisionScores(list(dominance.split(counts)), list(keys.split(counts)), list(patch.split(counts)),
                            list(features.split(counts)))

    @property
    def next_position(self) -> torch.Tensor:
        """[B] the position the first generated token takes: one past the largest prompt position."""
        pos = self.position_ids.amax(0).masked_fill(~self.attention_mask, -1)
        return pos.amax(1) + 1


class Adapter:
    """Base adapter; a family's adapter class is its entry in the family registry (`register_family`).

    A subclass implements `prepare` and sets what the rest of vlmprune asks about its family:
    ``model_type`` (the ``config.model_type`` it serves), ``model_class`` (the transformers class that
    loads it: its name in ``transformers``, or the class itself), ``label`` (a human name for
    messages), ``vision_blocks`` (the dotted path, from the top-level model, of the vision tower's
    block list that weight pruning calibrates and prunes), ``vision_cost`` (how `eval.flops` prices its
    vision tower and projector, `models.vision_cost`), ``processor_class`` (its processor class in
    ``transformers`` when that one has a video sub-processor needing torchvision, else None),
    ``downsample`` (whether `Downsample` can re-encode its images at a lower resolution) and
    ``fixed_resolution`` (every image gives the same visual tokens, as LLaVA-1.5's).
    """

    model_type: str = ""
    model_class: str | type = ""
    label: str = ""
    vision_blocks: str = ""
    vision_cost: VisionCost | None = None
    processor_class: str | None = None
    downsample: bool = False
    fixed_resolution: bool = False
    position_axes: int = 1

    @classmethod
    def class_name(cls) -> str:
        """The transformers class's name, e.g. ``LlavaForConditionalGeneration``."""
        return cls.model_class if isinstance(cls.model_class, str) else cls.model_class.__name__

    @classmethod
    def description(cls) -> str:
        """The family as messages name it, e.g. ``LlavaForConditionalGeneration (LLaVA-1.5)``."""
        return f"{cls.class_name()} ({cls.label})"

    @classmethod
    def transformers_class(cls) -> type:
        """The class that loads this family's checkpoints (``model_class``, looked up in ``transformers``)."""
        if not isinstance(cls.model_class, str):
            return cls.model_class
        import transformers

        found = getattr(transformers, cls.model_class, None)
        if found is None:
            raise VlmpruneError(
                f"{cls.description()}: transformers {transformers.__version__} has no class {cls.model_class}; "
                "install a transformers version that has it"
            )
        return found

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        impl = self.text_config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise VlmpruneError(
                f"attention implementation {impl!r} is not supported by the engine; load the model with "
                f"attn_implementation='sdpa' (or 'eager')"
            )
        self.attn_implementation = impl
        self.image_token_id = int(self.config.image_token_id)
        lm = self.language_model
        self.decoder = DecoderLayout(lm.embed_tokens, lm.layers, lm.norm, model.lm_head, lm.rotary_emb)
        self._placement: Placement | None = None

    def placement(self) -> Placement:
        """Where each part of the language model computes (see `Placement`): worked out once and kept
        while the embedding stays where it was (moving the whole model with ``.to`` refreshes it;
        after moving single layers by hand, wrap the model again)."""
        dec = self.decoder
        home = execution_device(dec.embed_tokens, torch.device("cpu"))
        if self._placement is None or self._placement.input != home:
            layers = tuple(execution_device(layer, home) for layer in dec.layers)
            norm = execution_device(dec.norm, layers[-1] if layers else home)
            self._placement = Placement(home, layers, norm, execution_device(dec.lm_head, norm),
                                        execution_device(dec.rotary_emb, home))
        return self._placement

    # ------------------------------------------------------------------ accessors
    @property
    def language_model(self) -> nn.Module:
        """The decoder-only text model inside the VLM (transformers names it `model.language_model`)."""
        return self.model.model.language_model

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **vision) -> PreparedInputs:
        raise NotImplementedError

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``[A, B, L]`` of any subset of tokens, on `hidden`'s device and in its dtype
        (computed where the rotary embedding lives)."""
        pos = position_ids[0] if self.position_axes == 1 else position_ids
        at = self.placement().rotary
        cos, sin = self.decoder.rotary_emb(hidden.to(at), pos.to(at))
        return cos.to(hidden.device), sin.to(hidden.device)

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise VlmpruneError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise VlmpruneError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        return attention_mask.bool()

    def _scatter_visual(
        self, embeds: torch.Tensor, visual_mask: torch.Tensor, features: torch.Tensor | None
    ) -> torch.Tensor:
        """Put the projected visual features into the image-placeholder slots."""
        n_slots = int(visual_mask.sum())
        if features is None:
            if n_slots:
                raise VlmpruneError(
                    f"the prompt has {n_slots} image placeholder tokens but no image was given; pass pixel_values"
                )
            return embeds
        if features.shape[0] != n_slots:
            raise VlmpruneError(
                f"the image gives {features.shape[0]} visual tokens but the prompt has {n_slots} image placeholders; "
                "build the prompt with the model's processor (it expands the image placeholder)"
            )
        return embeds.masked_scatter(visual_mask[..., None].to(embeds.device), features.to(embeds.device, embeds.dtype))

    @staticmethod
    @contextmanager
    def _recording_input(module: nn.Module) -> Iterator[dict]:
        """Record references to the positional and keyword inputs of `module`'s call inside the block
        (``record["args"]``, ``record["kwargs"]``), by a forward pre-hook that is removed on exit."""
        record: dict = {}

        def hook(mod, args, kwargs):
            record["args"], record["kwargs"] = args, dict(kwargs)

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield record
        finally:
            handle.remove()

    # ------------------------------------------------------------------ attention-score rows
    def attention_rows(
        self,
        layer_idx: int,
        hidden_in: torch.Tensor,
        query_index: torch.Tensor,
        query_positions: torch.Tensor,
        keys: torch.Tensor,
        key_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Attention probabilities of a few query rows against all keys of one layer.

        Args:
            hidden_in: ``[B, R, D]`` the layer's *input* hidden states at the query rows.
            query_index: ``[B, R]`` each query's index in the current sequence (for causality).
            query_positions: ``[A, B, R]`` their rotary positions.
            keys: ``[B, Hkv, T, d]`` the layer's post-RoPE keys, as stored in the KV cache.
            key_valid: ``[B, T]`` which keys are real tokens.

        Returns ``[B, H, R, T]`` float32 probabilities, equal to the rows of the full eager attention map
        (scores ``q k^T * scaling``, causal and padding mask, softmax over keys). Costs one q projection
        of R rows and an ``R x T`` score block; the model keeps running under sdpa. Computed on the
        layer's device (where its cache lives), offloaded weights included (`onloaded`); returned on
        `query_index`'s device.
        """
        layer = self.decoder.layers[layer_idx]
        attn = layer.self_attn
        out_device = query_index.device
        device = keys.device
        hidden_in, query_index, key_valid = hidden_in.to(device), query_index.to(device), key_valid.to(device)
        with onloaded(layer.input_layernorm, attn.q_proj):
            x = layer.input_layernorm(hidden_in).to(device)
            bsz, n_rows, _ = x.shape
            q = attn.q_proj(x).to(device).view(bsz, n_rows, -1, attn.head_dim).transpose(1, 2)  # (B, H, R, d)
        cos, sin = self.rotary(x, query_positions)
        # the family's own RoPE application, taken from the attention module's source module
        apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, _ = apply_rope(q, q, cos, sin)
        k = keys.repeat_interleave(attn.num_key_value_groups, dim=1)  # (B, H, T, d)
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling  # (B, H, R, T)
        t = torch.arange(keys.shape[2], device=keys.device)
        allowed = key_valid[:, None, None, :] & (t[None, None, None, :] <= query_index[:, None, :, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).to(out_device)
