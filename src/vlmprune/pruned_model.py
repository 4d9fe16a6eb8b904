"""`PrunedModel`: a transformers VLM plus the engine, called like the model with a ``prune=`` decision."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import VlmpruneError
from .engine.plan import Plan
from .engine.runner import LayerPolicy, decode_step, prefill
from .engine.sampling import SamplingConfig
from .engine.stats import RunStats
from .models import adapter_for
from .models.base import PreparedInputs

@dataclass
class PrunedOutput:
    """``logits [B, L_out, V]`` for the tokens that reached the head, in original order; ``token_index``
    maps each row to its prompt index (-1 for padding slots). Without token drops ``L_out`` is the
    prompt length and the layout equals the input's. ``inputs``: the inputs the model ran on when a
    method re-encoded the images before the vision tower (Downsample), else None; the rows and
    ``token_index`` then refer to its ``input_ids``."""

    logits: torch.Tensor
    token_index: torch.Tensor
    last_logits: torch.Tensor
    stats: RunStats
    inputs: dict | None = None


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, L + new] prompt followed by generated ids, like transformers' generate
    scores: list[torch.Tensor]  # one [B, V] logits tensor per generated token
    stats: RunStats  # prefill accounting; kv_entries counted after the last decode step
    prefill_seconds: float = 0.0  # wall time of the prefill (decision included)
    decode_seconds: float = 0.0  # wall time of the decode steps after it
    decode_steps: int = 0  # decode steps run (generated tokens - 1)
    inputs: dict | None = None  # the re-encoded inputs the prefill ran on (Downsample), else None


@dataclass(frozen=True)
class ModelInputs:
    """A batch as the caller gave it, before the vision tower: what a FLOPs budget prices a method that
    re-encodes the images on (its ``lm_counts(pm, inputs)``), without running the tower. It has the
    attributes of `PreparedInputs` such a method and `AtFlops` read."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] bool
    image_inputs: dict  # pixel_values and image_sizes / image_grid_thw
    image_token_id: int

    @property
    def n_visual(self) -> list[int]:
        return ((self.input_ids == self.image_token_id) & self.attention_mask).sum(1).tolist()


def reencode_inputs(prune: Any, pm: "PrunedModel", inputs: dict) -> tuple[dict, Any]:
    """Before the vision tower: the method of `prune` that changes the model's inputs (one with
    ``reencode(pm, inputs) -> inputs``, e.g. `Downsample`) re-encodes them. It may be `prune` itself, a
    member of a list or `Compose`, or the method of an `AtFlops`, whose budget is then resolved on these
    inputs (priced by the method's ``lm_counts``, no vision pass). At most one method may re-encode.

    Returns (the inputs the model runs on, the rest of the decision: what decides on the re-encoded
    inputs, None if nothing). Without such a method: `inputs` itself and `prune` unchanged."""
    from .methods.base import Compose
    from .methods.budget import AtFlops
    from .methods.protocols import Reencodes

    members = list(prune) if isinstance(prune, (list, tuple)) else list(prune.methods) if isinstance(prune, Compose) else [prune]
    reencoding = [m for m in members if isinstance(m, Reencodes) or (isinstance(m, AtFlops) and isinstance(m.method, Reencodes))]
    if not reencoding:
        return inputs, prune
    if len(reencoding) > 1:
        raise VlmpruneError("at most one method may re-encode the images before the vision tower (e.g. downsample)")
    method = reencoding[0]
    if isinstance(method, AtFlops):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
        method = method.resolve(pm, ModelInputs(ids, mask, images, pm.adapter.image_token_id)).method
    rest = [m for m in members if m is not reencoding[0]]
    return method.reencode(pm, inputs), (rest[0] if len(rest) == 1 else rest or None)


def resolve_prune(prune: Any, pm: "PrunedModel", prep: PreparedInputs) -> tuple[Plan, list[LayerPolicy]]:
    """Turn the ``prune=`` argument into a static plan plus in-model policies."""
    if prune is None:
        return Plan(), []
    if isinstance(prune, Plan):
        return prune, []
    from .methods.base import Compose
    from .methods.protocols import Method

    if isinstance(prune, (list, tuple)):
        prune = Compose(*prune)
    if isinstance(prune, Method):  # a method object: returns (plan, policies) for this batch
        return prune.decide(pm, prep)
    raise VlmpruneError(f"prune= takes None, a vlmprune.Plan or a pruning method, got {type(prune).__name__}")


class PrunedModel:
    """Wraps an unmodified transformers vision-language model; the weights are shared, not copied."""

    def __init__(self, model: nn.Module, processor: Any = None):
        self.adapter = adapter_for(model)
        self.model = model.eval()
        self.processor = processor
        self._vision_args = set(inspect.signature(self.adapter.prepare).parameters) - {"input_ids", "attention_mask"}

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.adapter.decoder.n_layers

    @property
    def input_device(self) -> torch.device:
        """Where the model takes its inputs: the token embedding's (execution) device. Inputs given
        elsewhere are moved here; logits and generated ids come back here."""
        return self.adapter.placement().input

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device the language model computes on (more than one when split by a device_map)."""
        place = self.adapter.placement()
        return tuple(dict.fromkeys((place.input, *place.layers, place.norm, place.head)))

    def to_input_device(self, inputs: dict) -> dict:
        """The tensors of `inputs` on `input_device` (the vision tower's hooks take pixels on from there)."""
        device = self.input_device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **vision) -> PreparedInputs:
        unknown = set(vision) - self._vision_args
        if unknown:
            raise VlmpruneError(
                f"unexpected inputs {sorted(unknown)} for {self.config.model_type}; it takes {sorted(self._vision_args)}"
            )
        inputs = self.to_input_device(dict(input_ids=input_ids, attention_mask=attention_mask, **vision))
        return self.adapter.prepare(**inputs)

    def prepare_for(self, prune: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **vision) -> tuple[PreparedInputs, Any, dict | None]:
        """`prepare` under the decision `prune`: a method of it that re-encodes the images before the
        vision tower (`reencode_inputs`, e.g. Downsample) does so first. Returns (the prepared inputs,
        the rest of the decision, the re-encoded inputs or None when they are the caller's)."""
        inputs = self.to_input_device(dict(input_ids=input_ids, attention_mask=attention_mask, **vision))
        ran, rest = reencode_inputs(prune, self, inputs)
        if ran is inputs:  # nothing re-encoded (no such method, or its images keep their resolution)
            return self.prepare(**inputs), rest, None
        return self.prepare(**ran), rest, ran

    def _note_reencoded(self, stats: RunStats, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        ran: dict | None) -> None:
        """A run on re-encoded images: the caller's visual tokens stay ``input_visual`` (shares are of
        the unpruned model) and the tower's geometry goes to ``vision_inputs`` (it is priced from there)."""
        if ran is None:
            return
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        geometry = {k: ran[k].cpu() for k in ("image_sizes", "image_grid_thw") if ran.get(k) is not None}
        stats.vision_inputs = dict(geometry, n_visual=stats.input_visual.tolist())
        stats.input_visual = ((input_ids == self.adapter.image_token_id) & mask.to(input_ids.device)).sum(1).cpu()

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prune: Any = None,
        logits_to_keep: int = 0,
        **vision,
    ) -> PrunedOutput:
        prep, prune, ran = self.prepare_for(prune, input_ids, attention_mask, **vision)
        plan, policies = resolve_prune(prune, self, prep)
        res = prefill(self.adapter, prep, plan, policies, logits_to_keep)
        self._note_reencoded(res.stats, input_ids, attention_mask, ran)
        return PrunedOutput(res.logits, res.token_index, res.last_logits, res.stats, ran)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prune: Any = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        return_dict: bool = False,
        **vision,
    ) -> torch.Tensor | GenerationResult:
        """Generate up to `max_new_tokens` per sample; returns prompt + new ids like transformers' generate.

        `eos_token_id`: None (default) takes the model's generation config's, ``()`` stops at no token; a finished sample is padded with
        `pad_token_id` (default: the generation config's, else the first eos id) and generation stops when all have finished.
        Sampling is reproducible from `seed`.
        """
        if max_new_tokens < 1:
            raise VlmpruneError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise VlmpruneError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                f"{limit} positions; lower max_new_tokens or shorten the prompt"
            )
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        eos = self.eos_ids(eos_token_id)
        if pad_token_id is None:  # as transformers: the generation config's pad id, else the first eos id
            pad_token_id = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        input_ids = input_ids.to(self.input_device)
        generator = None
        if do_sample:
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(0 if seed is None else seed)

        t0 = time.perf_counter()
        prep, prune, ran = self.prepare_for(prune, input_ids, attention_mask, **vision)
        plan, policies = resolve_prune(prune, self, prep)
        res = prefill(self.adapter, prep, plan, policies, logits_to_keep=1)
        self._note_reencoded(res.stats, input_ids, attention_mask, ran)
        logits, positions = res.last_logits, res.next_position.clone()
        _sync(logits)
        t1 = time.perf_counter()
        res.cache.reserve(max_new_tokens - 1)  # decode steps write in place (engine/cache.py)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
        new_tokens, scores = [], []
        for step in range(max_new_tokens):
            scores.append(logits)
            token = sampling.choose(logits, generator)
            if eos:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.isin(token, eos_t)
            new_tokens.append(token)
            if step == max_new_tokens - 1 or (eos and bool(finished.all())):  # (a host read only with an eos to stop at)
                break
            logits = decode_step(self.adapter, res.cache, token, positions)
            positions += 1
        sequences = torch.cat([input_ids, torch.stack(new_tokens, 1)], dim=1)
        _sync(sequences)
        t2 = time.perf_counter()
        if not return_dict:
            return sequences
        stats = res.stats
        stats.kv_entries, stats.kv_bytes = res.cache.entries(), res.cache.nbytes()
        return GenerationResult(sequences, scores, stats, t1 - t0, t2 - t1, len(new_tokens) - 1, ran)

    @torch.no_grad()
    def score_response(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response: torch.Tensor,
        prune: Any = None,
        **vision,
    ) -> tuple[torch.Tensor, RunStats]:
        """Teacher-forced log-probabilities ``[B, N, V]`` (float32) of a given response ``[B, N]``
        (e.g. the full model's greedy answer) under `prune`: the decision is taken on the prompt, as
        in `generate`, and each response token is fed through the pruned KV cache in turn. Row ``t``
        is the distribution the model gives response token ``t``; rows after a sample's end are
        whatever the fed padding gives (mask them)."""
        if response.dim() != 2 or response.shape[0] != input_ids.shape[0] or response.shape[1] < 1:
            raise VlmpruneError(f"response must be [batch, >= 1] token ids for the batch, got {tuple(response.shape)}")
        prep, prune, ran = self.prepare_for(prune, input_ids, attention_mask, **vision)
        plan, policies = resolve_prune(prune, self, prep)
        res = prefill(self.adapter, prep, plan, policies, logits_to_keep=1)
        self._note_reencoded(res.stats, input_ids, attention_mask, ran)
        positions = res.next_position.clone()
        res.cache.reserve(response.shape[1] - 1)
        rows = [res.last_logits.float().log_softmax(-1)]
        for t in range(response.shape[1] - 1):
            logits = decode_step(self.adapter, res.cache, response[:, t].to(positions.device), positions)
            positions += 1
            rows.append(logits.float().log_softmax(-1))
        return torch.stack(rows, 1), res.stats

    def eos_ids(self, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """The end-of-sequence ids generation stops at: `eos_token_id`'s (``()``: none), or with None the
        generation config's (none when it has none); ids outside the vocabulary are dropped."""
        if eos_token_id is None:
            gen = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            return []
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        vocab = self.adapter.text_config.vocab_size
        return [int(i) for i in ids if 0 <= int(i) < vocab]


def _sync(tensor: torch.Tensor) -> None:
    """Wait for the device (timings of asynchronous CUDA work)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
