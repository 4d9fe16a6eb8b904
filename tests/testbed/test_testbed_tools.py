"""The testbed's encoder, cell geometry, decisions and resumable training."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlmprune
from vlmprune.testbed import data, eval_set
from vlmprune.testbed.decisions import asked_cell, nonempty_cells, random_keep
from vlmprune.testbed.encode import N_VISUAL, cell_token_indices, encode
from vlmprune.testbed.recipe import random_checkpoint

needs_fmnist = pytest.mark.skipif(not data.DEFAULT_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    return vlmprune.load(random_checkpoint(tmp_path_factory.mktemp("recipe"), words=data.vocabulary()))


def test_encode_equals_the_checkpoint_processor(recipe_model):
    samples = eval_set(6)
    ours = encode(samples, recipe_model.processor.tokenizer)
    for b, s in enumerate(samples):
        ref = recipe_model.processor(images=Image.fromarray(s.image), text=data.prompt(s.question), return_tensors="pt")
        row = ours["attention_mask"][b].bool()
        assert torch.equal(ours["input_ids"][b, row], ref["input_ids"][0])
        torch.testing.assert_close(ours["pixel_values"][b], ref["pixel_values"][0], atol=1e-6, rtol=0)
    assert int((ours["input_ids"][0] == recipe_model.adapter.image_token_id).sum()) == N_VISUAL


@pytest.mark.parametrize("cell", range(9))
def test_cell_token_indices_cover_exactly_the_cell(cell):
    image = np.zeros((84, 84), dtype=np.uint8)
    r, c = divmod(cell, 3)
    image[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = 255
    patches = image.reshape(12, 7, 12, 7).transpose(0, 2, 1, 3).reshape(144, 49)  # row-major 7x7 patches
    brute = torch.tensor(np.flatnonzero(patches.any(1)))
    assert torch.equal(cell_token_indices(cell).sort().values, brute)


def test_oracles_keep_the_answer_tokens():
    samples = eval_set(40)
    plan = nonempty_cells(samples)
    for s, row in zip(samples, plan.keep[0]):
        expect = sorted(i for c, cls in enumerate(s.cells) if cls >= 0 for i in cell_token_indices(c).tolist())
        assert row.tolist() == expect
    cells = [s for s in samples if s.qtype == "cell"]
    for s, row in zip(cells, asked_cell(cells).keep[0]):
        assert row.tolist() == cell_token_indices(data.CELLS.index(s.question.split()[-2])).sort().values.tolist()
        assert data.CELLS[int(row[0]) // 12 // 4 * 3 + int(row[0]) % 12 // 4] in s.question
    with pytest.raises(vlmprune.VlmpruneError, match="cell questions only"):
        asked_cell([s for s in samples if s.qtype != "cell"][:1])


def test_random_keep_is_seeded_and_sized():
    batch = eval_set(8)
    a, b = random_keep(0.25, seed=3)(batch), random_keep(0.25, seed=3)(batch)
    assert a == b and all(r.numel() == 36 for r in a.keep[0])
    assert random_keep(0.25, seed=4)(batch) != a
    with pytest.raises(vlmprune.VlmpruneError, match=r"\(0, 1\]"):
        random_keep(0.0)


@needs_fmnist
def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    from vlmprune.testbed.train import TrainConfig, train

    common = dict(steps=4, batch_size=4, hidden=64, warmup=2, save_every=100, eval_every=100, eval_samples=8, seed=5)
    straight = TrainConfig(out=str(tmp_path / "a"), **common)
    interrupted = TrainConfig(out=str(tmp_path / "b"), **common)
    train(straight, progress=False)
    assert train(interrupted, progress=False, stop_after=2) is None
    assert not (tmp_path / "b" / "model").exists() and (tmp_path / "b" / "state" / "state.json").is_file()
    seen = []

    def evaluate(model, processor, samples):  # the held-out hook the CLI fills with eval.vqa.evaluate
        seen.append((model.training, len(samples)))
        return SimpleNamespace(accuracy=0.5, per_type={"cell": 0.5})

    record = train(interrupted, progress=False, evaluate=evaluate)  # resumes at step 2
    assert record["log"][-1]["step"] == 4 and record["log"][-1]["accuracy"] == 0.5 and seen == [(False, 8)]
    assert "accuracy" not in json.loads((Path(straight.out) / "training.json").read_text())["log"][-1]
    a = load_file(Path(straight.out) / "model" / "model.safetensors")
    b = load_file(Path(interrupted.out) / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    from vlmprune.testbed.train import _initial_weights

    from_model, from_state = _initial_weights(Path(straight.out) / "model"), _initial_weights(Path(straight.out) / "state")
    assert from_model.keys() == from_state.keys() and all(torch.equal(from_model[k], from_state[k]) for k in from_model)
    with pytest.raises(vlmprune.VlmpruneError, match="neither a saved model"):
        _initial_weights(tmp_path)
    with pytest.raises(vlmprune.VlmpruneError, match="another configuration"):
        train(TrainConfig(out=interrupted.out, **{**common, "seed": 6}), progress=False)


def test_training_conversations_are_correct_and_start_like_the_eval_prompt(recipe_model):
    from vlmprune.testbed.recipe import build_tokenizer
    from vlmprune.testbed.train import TRAIN_WORDS, Example, describe, encode_conversations, more_questions

    tokenizer = build_tokenizer(data.vocabulary() + TRAIN_WORDS)
    samples = eval_set(50)
    rng = np.random.default_rng(0)
    for s in samples:
        for question, answer in more_questions(s, rng, 5):
            words = question.split()
            cls = lambda: data.CLASSES.index(words[-2])
            if words[0] == "what":
                c = s.cells[data.CELLS.index(words[-2])]
                assert answer == (data.CLASSES[c] if c >= 0 else "nothing")
            elif words[0] == "is":
                assert answer == ("yes" if cls() in s.cells else "no")
            elif words[0] == "how":
                assert answer == data.COUNT_WORDS[s.cells.count(cls())]
            else:
                assert s.cells.count(cls()) == 1 and answer == data.CELLS[s.cells.index(cls())]
    examples = [Example(s.image, ((s.question, s.answer), *more_questions(s, rng, 2))) for s in samples[:4]]
    batch = encode_conversations(examples + [describe(samples[4])], tokenizer)
    single = encode(samples[:1], tokenizer)
    n = single["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], single["input_ids"][0])
    vocab = tokenizer.get_vocab()
    labelled = batch["labels"][0][batch["labels"][0] >= 0].tolist()
    assert labelled == [vocab[a] for _, a in examples[0].turns] + [tokenizer.eos_token_id]
    assert len(batch["labels"][4][batch["labels"][4] >= 0]) == 18 + 1  # 9 cell names + 9 contents + </s>


def test_inventory_lists_every_present_class_with_exactly_its_cells():
    from vlmprune.testbed.train import INVENTORY, inventory

    rng = np.random.default_rng(0)
    for s in eval_set(60):
        ((question, answer),) = inventory(s, rng).turns
        assert question == INVENTORY
        rebuilt, cls = [data.EMPTY] * len(data.CELLS), None
        for w in answer.split():
            if w in data.CLASSES:
                assert cls is None or data.CLASSES.index(w) != cls
                cls = data.CLASSES.index(w)
            elif w != data.NOTHING:
                rebuilt[data.CELLS.index(w)] = cls
        assert tuple(rebuilt) == s.cells
        assert answer.split().count(data.NOTHING) == (1 if all(c == data.EMPTY for c in s.cells) else 0)


def test_word_alignment_loss_equals_a_per_token_loop():
    from vlmprune.testbed.recipe import build_tokenizer
    from vlmprune.testbed.train import TRAIN_WORDS, WordAlignment

    tokenizer = build_tokenizer(data.vocabulary() + TRAIN_WORDS)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    embed = torch.randn(len(vocab), 16)
    features = torch.randn(2, 144, 16)
    cells = torch.tensor([[0, 10, 3, 10, 9, 1, 2, 10, 5], [10] * 9])  # 10 = empty ("nothing")
    loss = WordAlignment(tokenizer)(features, embed, cells)
    class_words = [*data.CLASSES, data.NOTHING]
    total = 0.0
    for b in range(2):
        for t in range(144):
            f = torch.nn.functional.normalize(features[b, t], dim=0)
            cell = (t // 12 // 4) * 3 + (t % 12) // 4
            cos = lambda words: torch.stack([f @ torch.nn.functional.normalize(embed[vocab[w]], dim=0) for w in words])
            total += -torch.log_softmax(10 * cos(class_words), 0)[cells[b, cell]]
            total += -torch.log_softmax(10 * cos(data.CELLS), 0)[cell]
    torch.testing.assert_close(loss, total / (2 * 144))


def test_drop_empty_cells_removes_exactly_the_empty_cells_tokens():
    from vlmprune.testbed.train import drop_empty_cells

    torch.manual_seed(0)
    n_text = 5
    visual = torch.zeros(2, n_text + N_VISUAL + 3, dtype=torch.bool)
    visual[:, n_text:n_text + N_VISUAL] = True
    mask = torch.ones_like(visual, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    embeds = torch.randn(*visual.shape, 4)
    labels = torch.full(visual.shape, -100)
    labels[:, -3] = 7
    cells = torch.tensor([[10, 3, 10, 0, 10, 1, 2, 10, 4], [10] * 9])  # 10: empty
    out, out_mask, out_labels, positions = drop_empty_cells(embeds, mask, labels, visual, cells, torch.tensor([True, True]))
    for b in range(2):
        empty = {c for c in range(9) if cells[b, c] == 10}
        dropped = {n_text + int(i) for c in empty for i in cell_token_indices(c)}
        expected = [p for p in range(visual.shape[1]) if mask[b, p] and p not in dropped]  # a plain loop
        n = len(expected)
        assert positions[b, :n].tolist() == expected and out_mask[b, :n].all() and not out_mask[b, n:].any()
        assert torch.equal(out[b, :n], embeds[b, expected]) and out_labels[b, :n].tolist() == labels[b, expected].tolist()
    unchanged = drop_empty_cells(embeds, mask, labels, visual, cells, torch.tensor([False, False]))
    assert torch.equal(unchanged[0][0], embeds[0]) and unchanged[3][0].tolist() == list(range(visual.shape[1]))
