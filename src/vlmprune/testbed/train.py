"""`vlmprune testbed train`: train the testbed LLaVA from scratch on FashionScenes.

Every step draws fresh training scenes (train split only) from ``(seed, step)``, so a resumed run sees
exactly the data an uninterrupted one would. Each batch mixes questions (`turns` per image), the
describe task and the inventory task (see `describe`, `inventory`); with `drop_empty`, some
scenes lose their empty cells' visual tokens (`drop_empty_cells`). The loss is the answers'
cross-entropy plus `WordAlignment`, which ties every projected visual token to the language model's
embeddings of its cell's class word and cell name (a learned scale is its only parameter; it is not
part of the saved model). bf16 autocast, AdamW with warm-up and cosine decay.

State (model, aux head, optimizer: safetensors; step and log: JSON) is written atomically every
`save_every` steps under ``OUT/state`` (`vlmprune.training.ResumableRun`); running the same command
again resumes from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..data.calibration import training_scenes
from ..errors import VlmpruneError
from ..files import write_dir, write_json
from ..training import ResumableRun, step_seed
from . import data
from .encode import N_VISUAL, cell_token_indices, pixel_values
from .recipe import build_model, build_processor, build_tokenizer

DESCRIBE = "describe the image ?"  # "image" is not in the vocabulary: it encodes as <unk>, as the processor would
INVENTORY = "list the items ?"
TRAIN_WORDS = ["describe", "list", "items"]  # training-only words, added to the tokenizer after the task's vocabulary
HELDOUT_SEED_OFFSET = 99_991  # the held-out test-split scenes of a run seeded k: seed k + this


@dataclass(frozen=True)
class Example:
    """A training conversation about one image: (question, answer) turns; answers may be several words."""

    image: object
    turns: tuple[tuple[str, str], ...]


def describe(sample: data.Sample, rng: np.random.Generator | None = None) -> Example:
    """The describe task for a scene: each cell's name, then its class (or "nothing"), in row-major
    order, or in a random order when `rng` is given. In a fixed order the contents can be read off
    fixed relative positions; a random order forces reading the region that each cell *name* denotes."""
    order = range(len(data.CELLS)) if rng is None else rng.permutation(len(data.CELLS)).tolist()
    cells = sample.cells
    words = [w for i in order for w in (data.CELLS[i], data.CLASSES[cells[i]] if cells[i] != data.EMPTY else data.NOTHING)]
    return Example(sample.image, ((DESCRIBE, " ".join(words)),))


def inventory(sample: data.Sample, rng: np.random.Generator) -> Example:
    """The inventory task, the inverse of `describe`: each class present, in a random order, followed
    by the names of the cells holding it ("bag top-left right coat center"); "nothing" for an empty
    scene. It teaches finding the tokens of a class named in the text, which "exists", "count" and
    "where" questions need."""
    cells = sample.cells
    present = sorted({c for c in cells if c != data.EMPTY})
    words = []
    for c in rng.permutation(present).tolist() if present else []:
        words += [data.CLASSES[c]] + [data.CELLS[i] for i, x in enumerate(cells) if x == c]
    return Example(sample.image, ((INVENTORY, " ".join(words) or data.NOTHING),))


def more_questions(sample: data.Sample, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """`n` further questions about the same scene, answered from its cells by brute force."""
    cells = sample.cells
    counts = [cells.count(c) for c in range(len(data.CLASSES))]
    out = []
    while len(out) < n:
        qtype = data.QUESTION_TYPES[int(rng.integers(len(data.QUESTION_TYPES)))]
        t = data.QUESTION_TEMPLATES[qtype]
        if qtype == "cell":
            i = int(rng.integers(len(data.CELLS)))
            out.append((t.format(cell=data.CELLS[i]), data.CLASSES[cells[i]] if cells[i] != data.EMPTY else data.NOTHING))
        elif qtype == "exists":
            c = int(rng.integers(len(data.CLASSES)))
            out.append((t.format(cls=data.CLASSES[c]), "yes" if counts[c] else "no"))
        elif qtype == "count":
            c = int(rng.integers(len(data.CLASSES)))
            if counts[c] < len(data.COUNT_WORDS):
                out.append((t.format(cls=data.CLASSES[c]), data.COUNT_WORDS[counts[c]]))
        else:
            once = [c for c in range(len(data.CLASSES)) if counts[c] == 1]
            if once:
                c = once[int(rng.integers(len(once)))]
                out.append((t.format(cls=data.CLASSES[c]), data.CELLS[cells.index(c)]))
    return out


def encode_conversations(examples: Sequence[Example], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded training tensors: the first turn is the evaluation prompt, later turns continue it
    ("user : q assistant : a"); labels on every answer word and the final ``</s>``."""
    vocab = tokenizer.get_vocab()
    image_id, eos, unk = vocab["<image>"], tokenizer.eos_token_id, tokenizer.unk_token_id
    rows, labels = [], []
    for ex in examples:
        ids, lab = [], []
        for t, (question, answer) in enumerate(ex.turns):
            text = data.prompt(question) if t == 0 else f"user : {question} assistant :"
            for w in text.split():
                piece = [image_id] * N_VISUAL if w == "<image>" else [vocab.get(w, unk)]
                ids += piece
                lab += [-100] * len(piece)
            answer_ids = [vocab[w] for w in answer.split()]
            ids += answer_ids
            lab += answer_ids
        rows.append(ids + [eos])
        labels.append(lab + [eos])
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        label_t[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=mask, labels=label_t,
                pixel_values=pixel_values(np.stack([ex.image for ex in examples])))


@dataclass(frozen=True)
class TrainConfig:
    """steps x batch_size scenes; lr peaks after `warmup` steps, then decays (cosine) to lr * min_lr_ratio."""

    out: str
    steps: int = 2000
    batch_size: int = 32
    lr: float = 8e-4
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    describe: float = 0.15
    inventory: float = 0.15  # share of each batch on the inventory task (see `inventory`)
    shuffle_describe: bool = True  # describe the cells in a random order (see `describe`)
    turns: int = 4  # questions per training image (the first is the generator's balanced one)
    layers: int = 6
    hidden: int = 256
    seed: int = 0
    save_every: int = 100
    eval_every: int = 150
    eval_samples: int = 192
    init_from: str | None = None  # a model directory to start from (a second training stage)
    drop_empty: float = 0.0  # share of scenes whose empty cells' visual tokens are removed (see `drop_empty_cells`)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise VlmpruneError("steps and batch_size must be >= 1")
        if self.layers < 6:
            raise VlmpruneError("the testbed has at least 6 decoder layers")
        if not 0 <= self.drop_empty <= 1:
            raise VlmpruneError(f"--drop-empty {self.drop_empty} is outside [0, 1]: the share of scenes trained without their empty cells' tokens")


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_cells() -> torch.Tensor:
    """``[144]``: the grid cell (0..8) each visual token lies in."""
    cells = torch.empty(N_VISUAL, dtype=torch.long)
    for cell in range(len(data.CELLS)):
        cells[cell_token_indices(cell)] = cell
    return cells


class WordAlignment(nn.Module):
    """Auxiliary loss that aligns each projected visual token with word embeddings of the language
    model: the cosine (times a learned scale) to the embedding of its cell's class word (or "nothing")
    and to that of its cell's name are trained as two classifiers. Questions name classes and cells
    with the same words, so the LM finds the tokens a question asks about by matching embeddings."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        vocab = tokenizer.get_vocab()
        self.register_buffer("class_ids", torch.tensor([vocab[w] for w in (*data.CLASSES, data.NOTHING)]), persistent=False)
        self.register_buffer("cell_ids", torch.tensor([vocab[w] for w in data.CELLS]), persistent=False)
        self.register_buffer("cell_of_token", token_cells(), persistent=False)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, features: torch.Tensor, embed: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(features.float(), dim=-1)
        e = nn.functional.normalize(embed.float(), dim=-1)
        class_logits = self.scale * f @ e[self.class_ids].T  # [B, 144, 11]
        cell_logits = self.scale * f @ e[self.cell_ids].T  # [B, 144, 9]
        class_target = cells[:, self.cell_of_token]  # [B, 144]
        cell_target = self.cell_of_token.expand_as(class_target)
        ce = nn.functional.cross_entropy
        return ce(class_logits.flatten(0, 1), class_target.flatten()) + ce(cell_logits.flatten(0, 1), cell_target.flatten())


def drop_empty_cells(
    embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, visual: torch.Tensor, cells: torch.Tensor,
    chosen: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove the visual tokens of the empty cells of the `chosen` ``[B]`` scenes, as a pruning method
    would (the rest keep their positions); right-padded. ``visual [B, L]`` marks visual tokens, ``cells
    [B, 9]`` the classes (empty = the extra class). Returns (embeds, attention mask, labels, position ids).
    It teaches that a cell with no tokens holds nothing and to count cells, not a share of the image."""
    empty_class = len(data.CLASSES)
    cell_of_token = token_cells()
    keeps = []
    for b in range(embeds.shape[0]):
        keep = mask[b].bool().clone()
        if chosen[b]:
            where = visual[b].nonzero().squeeze(1)  # the 144 visual positions, in token order
            keep[where[cells[b, cell_of_token] == empty_class]] = False
        keeps.append(keep.nonzero().squeeze(1))
    length = max(k.numel() for k in keeps)
    out_embeds = embeds.new_zeros(embeds.shape[0], length, embeds.shape[-1])
    out_mask = torch.zeros(embeds.shape[0], length, dtype=mask.dtype)
    out_labels = torch.full((embeds.shape[0], length), -100, dtype=labels.dtype)
    positions = torch.zeros(embeds.shape[0], length, dtype=torch.long)
    for b, keep in enumerate(keeps):
        n = keep.numel()
        out_embeds[b, :n], out_mask[b, :n], out_labels[b, :n], positions[b, :n] = embeds[b, keep], 1, labels[b, keep], keep
    return out_embeds, out_mask, out_labels, positions


def _initial_weights(source: Path) -> dict[str, torch.Tensor]:
    """Weights to start from: a saved model directory (transformers checkpoint) or a training state directory."""
    if (source / "config.json").is_file():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(source).state_dict()
    if (source / "model.safetensors").is_file():
        return load_file(source / "model.safetensors")
    raise VlmpruneError(f"--init-from {source}: neither a saved model (config.json) nor a training state (model.safetensors)")


def _command(cfg: TrainConfig) -> str:
    """The CLI command that reproduces `cfg` (only options that differ from the defaults)."""
    defaults = TrainConfig(out=cfg.out)
    flags = [
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in asdict(cfg).items() if k != "out" and v != getattr(defaults, k)
    ]
    return " ".join(["vlmprune testbed train --out", cfg.out, *flags])


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None, evaluate=None) -> dict | None:
    """Train (or resume) and save ``OUT/model`` (a transformers checkpoint with its processor) and
    ``OUT/training.json`` (config, time, loss log, held-out accuracy).

    `evaluate(model, processor, samples)`: the held-out accuracy of the model in training, called every
    `eval_every` steps and at the end on `eval_samples` test-split scenes; it returns an object with
    ``accuracy`` and ``per_type`` (`eval.vqa.evaluate`'s result: the CLI passes it), which the log
    records. Without it the log holds the losses only. `stop_after` ends the run after that many steps
    in total, having saved the state (as an interruption would, at a save point); it returns None then.
    """
    out = Path(cfg.out)
    train_source = data.load_fashion_mnist("train")
    test_source = data.load_fashion_mnist("test")
    tokenizer = build_tokenizer(data.vocabulary() + TRAIN_WORDS)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed, layers=cfg.layers, hidden=cfg.hidden).train()
    torch.manual_seed(cfg.seed)
    aux = WordAlignment(tokenizer)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    if cfg.init_from:
        model.load_state_dict(_initial_weights(Path(cfg.init_from)))
    run = ResumableRun(out / "state", asdict(cfg), {"model": model, "aux": aux}, opt, params)
    run.resume()
    eval_set = data.generate(cfg.eval_samples, "test", seed=cfg.seed + HELDOUT_SEED_OFFSET, source=test_source)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    embed = model.get_input_embeddings()

    running = None
    for step in run.steps(cfg.steps, cfg.save_every, stop_after, progress, desc="train"):
        samples = training_scenes(cfg.batch_size, step_seed(cfg.seed, step), train_source)
        n_describe = round(cfg.describe * len(samples))
        n_inventory = round(cfg.inventory * len(samples))
        rng = np.random.default_rng([cfg.seed, step])
        examples = (
            [describe(s, rng if cfg.shuffle_describe else None) for s in samples[:n_describe]]
            + [inventory(s, rng) for s in samples[n_describe:n_describe + n_inventory]]
            + [Example(s.image, ((s.question, s.answer), *more_questions(s, rng, cfg.turns - 1)))
               for s in samples[n_describe + n_inventory:]]
        )
        batch = encode_conversations(examples, tokenizer)
        cells = torch.tensor([s.cells for s in samples])
        cells = cells.masked_fill(cells < 0, len(data.CLASSES))  # empty -> the extra class
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = torch.stack(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
            embeds = embed(batch["input_ids"]).masked_scatter((batch["input_ids"] == image_id)[..., None], features.to(embed.weight.dtype))
            mask, labels, positions = batch["attention_mask"], batch["labels"], None
            if cfg.drop_empty:
                chosen = torch.from_numpy(rng.random(len(samples)) < cfg.drop_empty)
                embeds, mask, labels, positions = drop_empty_cells(
                    embeds, mask, labels, batch["input_ids"] == image_id, cells, chosen)
            answer_loss = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss
        aux_loss = aux(features, embed.weight, cells)
        loss = answer_loss.float() + cfg.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        values = (answer_loss.item(), aux_loss.item())
        running = values if running is None else tuple(0.98 * r + 0.02 * v for r, v in zip(running, values))
        run.bar.set_postfix(answer=f"{running[0]:.3f}", cells=f"{running[1]:.3f}", lr=f"{_lr(cfg, step):.1e}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            entry = dict(step=done, answer_loss=running[0], cell_loss=running[1])
            if evaluate is not None:
                model.eval()
                acc = evaluate(model, processor, eval_set)
                model.train()
                entry.update(accuracy=acc.accuracy, per_type=acc.per_type)
                run.bar.write(f"step {done}: held-out accuracy {acc.accuracy:.3f} {acc.per_type}")
            run.log.append(entry)
    if run.stopped:
        return None

    model.eval()

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    write_dir(out / "model", write_model)
    record = dict(
        command=_command(cfg),
        config=asdict(cfg), seconds=run.elapsed, threads=torch.get_num_threads(), log=run.log,
        parameters=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
    )
    write_json(out / "training.json", record)
    return record
