"""`vlmprune` as an lmms-eval model: any checkpoint vlmprune loads, under any pruning method, answering
lmms-eval's ``generate_until`` and ``loglikelihood`` requests through the engine (physically pruned).

``--model_args`` (comma-separated ``key=value``):

* ``pretrained``: a checkpoint directory, a hub name, or ``testbed``;
* ``method``: registered method name(s), several joined by ``+`` (e.g. ``fastv+shortgpt``); any field of
  the method's dataclass (``keep``, ``layer``, ``keep_layers``, ``seed``, ``router``, ``layers``, ...) and
  ``flops`` (a share of the full LM prefill FLOPs, through `AtFlops`), as the CLI's flags;
* ``calib`` / ``calib_data``: calibration rows for methods that calibrate (ShortGPT);
* ``device``, ``dtype``, ``device_map``, ``trust_remote_code`` (default off): as `vlmprune.load`;
* ``stats``: where to write the run's accounting (default ``OUTPUT_PATH/vlmprune_stats.json`` when the
  command line has ``--output_path``).

Under ``accelerate launch`` each process takes its share of the requests (lmms-eval splits them by
rank); on CUDA each process uses the GPU of its local rank unless ``device`` / ``device_map`` is given.
The accounting is summed over processes and written by rank 0.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from ...data import Example, encode_examples, image_channels
from ...errors import VlmpruneError
from ...eval.accounting import RunTotals
from .stats import StatsWriter, summary_line

LOAD_KEYS = ("device", "dtype", "device_map", "trust_remote_code")
PADDING = "__padding_only__"  # lmms-eval marks the requests it repeats to even out ranks


def _method_names(method: str) -> str:
    return ",".join(n.strip() for n in str(method).split("+") if n.strip())


def _visual(visuals: list, where: str):
    """The one image of a request (None for text only); a clear error for what is not supported yet."""
    from PIL import Image

    if not visuals:
        return None
    if len(visuals) > 1:
        raise VlmpruneError(f"{where}: {len(visuals)} images in one request; the vlmprune lmms-eval model takes one "
                            "image per request for now (multi-image tasks are not supported yet)")
    visual = visuals[0]
    if not isinstance(visual, Image.Image):
        raise VlmpruneError(f"{where}: a {type(visual).__name__} visual (video or audio?); the vlmprune lmms-eval model "
                            "takes images only for now")
    return visual


def _cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop strings, as lmms-eval's own models cut their generations."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


KNOWN_ARGS = ("pretrained", "method", "flops", "batch_size", "max_batch_size", "stats", "calib", "calib_data", *LOAD_KEYS)


def check_model_args(model_args: dict[str, Any]) -> None:
    """Refuse bad method names and options (before any loading): what `VlmpruneLMM` would refuse."""
    from ...decisions import build_decision

    fields = {k: v for k, v in model_args.items() if k not in KNOWN_ARGS}
    method, flops = model_args.get("method"), model_args.get("flops")
    if not method and (fields or flops is not None):
        raise VlmpruneError(f"model_args {sorted([*fields, *(['flops'] if flops is not None else [])])} configure a "
                            "method: name it with method=NAME (e.g. method=fastv,keep=0.25)")
    if method:
        build_decision(_method_names(method), fields, flops)


class VlmpruneLMM(lmms):
    """The lmms-eval model ``vlmprune`` (see the module docstring for its ``model_args``)."""

    def __init__(self, pretrained: str = "testbed", method: str | None = None, flops: float | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, stats: str | None = None,
                 calib: int = 64, calib_data: str | None = None, device: str | None = None, dtype: str = "auto",
                 device_map: str | None = None, trust_remote_code: bool = False, **fields: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        from ... import load
        from ...decisions import build_decision, calibration_inputs

        check_model_args(dict(method=method, flops=flops, **fields))  # bad names and options fail before the slow load
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError as err:
            raise VlmpruneError(f"batch_size={batch_size!r}: give a number (auto is not supported)") from err
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self._world_size > 1 and device is None and device_map is None and torch.cuda.is_available():
            device = f"cuda:{self.accelerator.local_process_index}"  # one GPU per process
        self.method_text = _method_names(method) if method else None
        self.pm = load(str(pretrained), device=device, dtype=dtype, device_map=device_map,
                       trust_remote_code=bool(trust_remote_code))
        self._device = self.pm.input_device
        self.decision = None
        if self.method_text:
            self.decision = build_decision(self.method_text, fields, flops, self.pm,
                                           calibration=lambda pm: calibration_inputs(pm, int(calib), calib_data))
        self.channels = image_channels(self.pm.config)
        self.totals: dict[str, RunTotals] = defaultdict(RunTotals)  # by request type
        self.stats = StatsWriter(stats, dict(pretrained=str(pretrained), method=self.method_text, flops=flops,
                                             **{k: v for k, v in fields.items()}))

    # lmms-eval reads these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return getattr(self.pm.processor, "tokenizer", self.pm.processor)

    # ----------------------------------------------------------------------------- requests

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _example(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> Example:
        where = f"{task} doc {doc_id}"
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        return Example(image=_visual(list(visuals or []), where), prompt=context, origin=where)

    def _chunks(self, requests: list) -> list[list[int]]:
        """Indices of `requests` in batches: the real requests first, then lmms-eval's padding repeats
        (whose cost is not counted), so a batch never mixes the two. Batching changes no answer."""
        real = [i for i, r in enumerate(requests) if not (r.metadata or {}).get(PADDING)]
        pad = [i for i, r in enumerate(requests) if (r.metadata or {}).get(PADDING)]
        n = self.batch_size_per_gpu
        return [real[i : i + n] for i in range(0, len(real), n)] + [pad[i : i + n] for i in range(0, len(pad), n)]

    def _counts(self, requests: list, idx: list[int]) -> bool:
        return not (requests[idx[0]].metadata or {}).get(PADDING)

    def generate_until(self, requests: list) -> list:
        """Greedy (``temperature`` 0 or absent) or sampled answers up to ``max_new_tokens`` (default 128),
        cut at the ``until`` stop strings; requests are batched by their generation kwargs."""
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="vlmprune generate", disable=self.rank != 0)
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            sub = [requests[i] for i in members]
            for idx in self._chunks(sub):
                texts = self._generate([sub[i] for i in idx], kwargs, count=self._counts(sub, idx))
                for i, text in zip(idx, texts):
                    out[members[i]] = text
                bar.update(len(idx))
        bar.close()
        self._publish()
        return out  # type: ignore[return-value]

    def _generate(self, batch: list, kwargs: dict, count: bool) -> list:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0)
        examples = [self._example(r.args[0], r.args[2], r.args[3], r.args[4], r.args[5]) for r in batch]
        inputs = self.pm.to_input_device(encode_examples(self.pm.processor, examples, self.channels))
        res = self.pm.generate(**inputs, prune=self.decision, max_new_tokens=int(kwargs.get("max_new_tokens") or 128),
                               do_sample=temperature > 0, temperature=temperature or 1.0,
                               top_p=float(kwargs.get("top_p") or 1.0), return_dict=True)
        if count:
            self.totals["generate_until"].add(self.pm, res.stats, inputs, res.prefill_seconds, res.decode_seconds,
                                              res.decode_steps)
        eos = set(self.pm.eos_ids())
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        texts = []
        for b, row in enumerate(res.sequences[:, inputs["input_ids"].shape[1]:].tolist()):
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            text = _cut_at_stops(self.tokenizer.decode(row[:end], skip_special_tokens=True), until)
            texts.append(GenerationResult(text, TokenCounts(int(prompt_tokens[b]), end)))
        return texts

    def loglikelihood(self, requests: list) -> list:
        """For each (context, continuation): the **mean negative log-likelihood** of the continuation's tokens
        given the context and image, under the pruning decision (taken on the prompt, as in generation), and
        whether greedy decoding gives the continuation.

        lmms-eval 0.7.3 scores multiple choice by the *smallest* value (``np.argmin``), because its own HF
        models return the loss; vlmprune follows that convention. The pair is wrapped in a
        `GenerationResult`, since lmms-eval 0.7.3 turns a bare tuple into its string."""
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="vlmprune loglikelihood", disable=self.rank != 0)
        for idx in self._chunks(requests):
            for i, value in zip(idx, self._score([requests[i] for i in idx], count=self._counts(requests, idx))):
                out[i] = value
            bar.update(len(idx))
        bar.close()
        self._publish()
        return out

    def _score(self, batch: list, count: bool) -> list:
        examples, continuations = [], []
        for r in batch:
            context, target, doc_to_visual, doc_id, task, split = r.args
            text = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise VlmpruneError(f"{task} doc {doc_id}: the continuation {text!r} has no tokens")
            examples.append(self._example(context, doc_to_visual, doc_id, task, split))
            continuations.append(ids)
        inputs = self.pm.to_input_device(encode_examples(self.pm.processor, examples, self.channels))
        width = max(len(c) for c in continuations)
        response = torch.zeros(len(batch), width, dtype=torch.long)
        for b, ids in enumerate(continuations):
            response[b, : len(ids)] = torch.tensor(ids)
        log_probs, stats = self.pm.score_response(**inputs, response=response.to(self._device), prune=self.decision)
        if count:
            stats.kv_entries = stats.kv_bytes = 0  # scoring keeps no cache to report
            self.totals["loglikelihood"].add(self.pm, stats, inputs)
        log_probs = log_probs.float().cpu()
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        values = []
        for b, ids in enumerate(continuations):
            rows = log_probs[b, : len(ids)]
            target = torch.tensor(ids)
            nll = -float(rows.gather(1, target[:, None]).mean())
            greedy = bool((rows.argmax(-1) == target).all())
            values.append(GenerationResult((nll, greedy), TokenCounts(int(prompt_tokens[b]), len(ids))))
        return values

    def generate_until_multi_round(self, requests) -> list[str]:
        raise VlmpruneError("multi-round generation is not supported by the vlmprune lmms-eval model yet")

    # ----------------------------------------------------------------------------- accounting

    def _publish(self) -> None:
        """Sum the accounting over processes; rank 0 logs one line and writes the stats file."""
        totals = dict(self.totals)
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self._world_size
            torch.distributed.all_gather_object(parts, totals)
            totals = {}
            for part in parts:
                for kind, value in part.items():
                    totals[kind] = totals[kind] + value if kind in totals else value
        if self._rank == 0 and totals:
            print(f"vlmprune: {summary_line(sum(totals.values(), RunTotals()))}", file=sys.stderr)
            self.stats.write(totals, self._world_size)
