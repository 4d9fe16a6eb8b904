"""2:4 sparse kernels (`vlmprune.weights.semi_structured`): which linears qualify, checked against a
brute-force reading of the 2:4 rule, and the CPU fallback that leaves the model and its answers as they
were. The kernels' own arithmetic needs a CUDA GPU: `benchmarks/gpu_check.py` compares their logits
with the masked dense model's."""

import itertools

import pytest
import torch
from torch import nn

import vlmprune
from vlmprune.weights import semi_structured as ss


def brute_two_four(weight: torch.Tensor) -> bool:
    """Straight from the definition: in every row, each run of 4 input columns has at least 2 zeros."""
    if weight.shape[1] % 4:
        return False
    for r, g in itertools.product(range(weight.shape[0]), range(0, weight.shape[1], 4)):
        if sum(float(v) != 0.0 for v in weight[r, g : g + 4]) > 2:
            return False
    return True


def two_four(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly 2 of every 4 input columns kept (random positions per group)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    order = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)
    weight.view(rows, -1, 4).scatter_(-1, order[..., :2], 0.0)
    return weight.to(dtype)


@pytest.mark.parametrize("seed", range(6))
def test_is_two_four_agrees_with_the_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        rows, cols = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)) * 4
        cols += int(seed == 5)  # columns not a multiple of 4: never 2:4
        weight = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < 0.55)
        assert ss.is_two_four(weight) == brute_two_four(weight)
    assert ss.is_two_four(two_four(8, 16)) and brute_two_four(two_four(8, 16))


def _model(dtype=torch.bfloat16) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 32)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(two_four(64, 64, dtype))  # qualifies
        model[2].weight.copy_(two_four(48, 64, dtype))  # 2:4, but 48 rows: not a multiple of 32
        model[3].weight.copy_(two_four(32, 48, dtype))  # 2:4, but 48 columns: not a multiple of 64
    return model                                        # model[1]: dense, not a candidate


def test_conversion_takes_exactly_the_2_4_linears_the_kernels_accept():
    model, seen = _model(), []

    def convert(weight):
        seen.append(weight.clone())
        return weight

    report = ss.to_semi_structured(model, convert=convert)
    assert report.converted == ["0"] and report.notice is None
    assert set(report.skipped) == {"2", "3"}
    assert "rows a multiple of 32" in report.skipped["2"] and "columns of 64" in report.skipped["3"]
    assert len(seen) == 1 and torch.equal(seen[0], two_four(64, 64, torch.bfloat16))
    assert not model[0].weight.requires_grad

    fp32 = ss.to_semi_structured(_model(torch.float32), convert=convert)
    assert fp32.converted == [] and all("float16 / bfloat16" in why for why in fp32.skipped.values())


def test_cpu_fallback_leaves_the_model_and_says_why():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = model(x)
    with pytest.warns(UserWarning, match="need a CUDA GPU of compute capability 8.0"):
        report = ss.to_semi_structured(model)
    assert report.converted == [] and "stays dense" in report.summary()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), out)

    with pytest.warns(UserWarning, match="no linear of this model is 2:4-sparse"):
        ss.to_semi_structured(nn.Sequential(nn.Linear(8, 8)))


def test_load_with_sparse_kernels_on_cpu_gives_the_same_logits(user_checkpoints, tmp_path):
    path = user_checkpoints["llava"]
    plain = vlmprune.load(path)
    with torch.no_grad():  # 2:4 on every decoder linear, saved like a pruned checkpoint
        for module in plain.model.model.language_model.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] % 4 == 0:
                module.weight.copy_(module.weight * (two_four(*module.weight.shape) != 0))
    plain.model.save_pretrained(tmp_path, safe_serialization=True)
    plain.processor.save_pretrained(tmp_path)
    dense = vlmprune.load(tmp_path)
    with pytest.warns(UserWarning, match="need a CUDA GPU"):
        kernels = vlmprune.load(tmp_path, sparse_kernels=True)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(dense.model(input_ids=ids).logits, kernels.model(input_ids=ids).logits)


def test_cli_sparse_kernels_flag_answers_as_without_it(tmp_path, capsys):
    from vlmprune.cli import main

    base = ["generate", "--model", "testbed", "--prompt", "What is shown?", "--max-new-tokens", "3"]
    assert main(base) == 0
    plain = capsys.readouterr().out.splitlines()[0]
    with pytest.warns(UserWarning, match="no linear of this model is 2:4-sparse"):
        assert main([*base, "--sparse-kernels"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == plain
