"""`vlmprune testbed train`: train the testbed LLaVA from scratch on FashionScenes.

Every step draws fresh training scenes (train split only) from ``(seed, step)``, so a resumed run sees
exactly the data an uninterrupted one would. The loss is the answer's cross-entropy plus an auxiliary
cell-classification loss: a linear head on each cell's mean-pooled projected visual tokens predicts
the cell's class or "empty" (9 labels per scene speed up learning the vision tower from scratch; the
head is not part of the saved model). bf16 autocast, AdamW with warm-up and cosine decay.

State (model, aux head, optimizer: safetensors; step and log: JSON) is written atomically every
`save_every` steps under ``OUT/state``; running the same command again resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import VlmpruneError
from . import data
from .encode import encode
from .recipe import build_model, build_processor, build_tokenizer

CELL_SIDE = data.ITEM_SIZE // 7  # patches per cell side (patch 7)


@dataclass(frozen=True)
class TrainConfig:
    """steps x batch_size scenes; lr peaks after `warmup` steps, then decays (cosine) to lr * min_lr_ratio."""

    out: str
    steps: int = 2400
    batch_size: int = 32
    lr: float = 8e-4
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    layers: int = 6
    hidden: int = 256
    seed: int = 0
    save_every: int = 100
    eval_every: int = 400
    eval_samples: int = 256

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise VlmpruneError("steps and batch_size must be >= 1")
        if self.layers < 6:
            raise VlmpruneError("the testbed has at least 6 decoder layers")


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def cell_features(features: torch.Tensor) -> torch.Tensor:
    """``[B, 144, D]`` projected visual tokens -> ``[B, 9, D]`` mean per grid cell."""
    b, _, d = features.shape
    grid = features.view(b, data.GRID, CELL_SIDE, data.GRID, CELL_SIDE, d)  # (B, row, py, col, px, D)
    return grid.mean(dim=(2, 4)).reshape(b, data.GRID * data.GRID, d)


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            out[f"{i}.{key}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value.detach().clone()
    return out


def _load_optimizer(opt: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        p = params[int(i)]
        opt.state[p][key] = value.reshape(()) if key == "step" else value


def _atomic_dir(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> dict | None:
    """Train (or resume) and save ``OUT/model`` (a transformers checkpoint with its processor) and
    ``OUT/training.json`` (config, time, loss log, held-out accuracy).

    `stop_after` ends the run after that many steps in total, having saved the state (as an
    interruption would, at a save point); it returns None then.
    """
    from ..eval.vqa import evaluate
    from ..loading import wrap

    out = Path(cfg.out)
    state_dir = out / "state"
    train_source = data.load_fashion_mnist("train")
    test_source = data.load_fashion_mnist("test")
    tokenizer = build_tokenizer(data.vocabulary())
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed, layers=cfg.layers, hidden=cfg.hidden).train()
    torch.manual_seed(cfg.seed)
    aux = nn.Linear(model.config.text_config.hidden_size, len(data.CLASSES) + 1)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    start, log, elapsed = 0, [], 0.0
    if (state_dir / "state.json").is_file():
        state = json.loads((state_dir / "state.json").read_text())
        if state["config"] != asdict(cfg):
            raise VlmpruneError(f"{state_dir} holds a run with another configuration; use another --out or delete it")
        model.load_state_dict(load_file(state_dir / "model.safetensors"))
        aux.load_state_dict(load_file(state_dir / "aux.safetensors"))
        _load_optimizer(opt, params, load_file(state_dir / "optimizer.safetensors"))
        start, log, elapsed = state["step"], state["log"], state["elapsed"]
    eval_set = data.generate(cfg.eval_samples, "test", seed=cfg.seed + 99_991, source=test_source)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    embed = model.get_input_embeddings()

    def save_state(step: int) -> None:
        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            save_file(aux.state_dict(), tmp / "aux.safetensors")
            save_file(_optimizer_tensors(opt, params), tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps(
                dict(config=asdict(cfg), step=step, log=log, elapsed=elapsed + time.perf_counter() - t_start)
            ))

        _atomic_dir(state_dir, write)

    t_start = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    running = None
    for step in bar:
        samples = data.generate(cfg.batch_size, "train", seed=cfg.seed * 1_000_003 + step, source=train_source)
        batch = encode(samples, tokenizer, with_answer=True, padding_side="right")
        cells = torch.tensor([s.cells for s in samples])
        cells = cells.masked_fill(cells < 0, len(data.CLASSES))  # empty -> the extra class
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = torch.stack(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
            embeds = embed(batch["input_ids"]).masked_scatter((batch["input_ids"] == image_id)[..., None], features.to(embed.weight.dtype))
            answer_loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            aux_logits = aux(cell_features(features))
        aux_loss = nn.functional.cross_entropy(aux_logits.float().reshape(-1, aux_logits.shape[-1]), cells.reshape(-1))
        loss = answer_loss.float() + cfg.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        values = (answer_loss.item(), aux_loss.item())
        running = values if running is None else tuple(0.98 * r + 0.02 * v for r, v in zip(running, values))
        bar.set_postfix(answer=f"{running[0]:.3f}", cells=f"{running[1]:.3f}", lr=f"{_lr(cfg, step):.1e}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            acc = evaluate(wrap(model, processor), eval_set, progress=False)
            model.train()
            log.append(dict(step=done, answer_loss=running[0], cell_loss=running[1], accuracy=acc.accuracy, per_type=acc.per_type))
            bar.write(f"step {done}: held-out accuracy {acc.accuracy:.3f} {acc.per_type}")
        if done % cfg.save_every == 0 or done == cfg.steps or done == stop_after:
            save_state(done)
        if done == stop_after:
            return None
    elapsed += time.perf_counter() - t_start

    model.eval()

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    _atomic_dir(out / "model", write_model)
    record = dict(
        command=f"vlmprune testbed train --out {cfg.out} --steps {cfg.steps} --batch-size {cfg.batch_size} --seed {cfg.seed}",
        config=asdict(cfg), seconds=elapsed, threads=torch.get_num_threads(), log=log,
        parameters=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
    )
    tmp = out / "training.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "training.json")
    return record
