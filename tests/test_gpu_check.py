"""benchmarks/gpu_check.py runs end to end on the CPU with tiny sizes (--smoke) and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_on_cpu(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(a) equivalence" in printed and "(b) prefill" in printed and "(c) decode" in printed
    result = json.loads(out.read_text())
    assert {"date", "gpu", "torch", "transformers", "equivalence", "split", "speed", "passed"} <= set(result)
    assert result["passed"] and result["torch"] == torch.__version__ and result["smoke"]
    assert {r["family"] for r in result["equivalence"]} == set(gpu_check.SMOKE["families"])
    assert gpu_check.FULL["families"] == gpu_check.FULL["split_families"] == gpu_check.FAMILIES  # the GPU run checks all four
    assert all(r["max_abs_logit_diff"] <= 0.02 * r["max_abs_logit"] for r in result["equivalence"])
    assert {r["prune"] for r in result["split"]} == set(gpu_check._split_decisions())
    speed = result["speed"]
    assert [r["setting"] for r in speed["prefill"]][:2] == ["full", "fastv K=2 keep 25%"]
    for row in speed["prefill"]:
        assert row["prefill_ms"] > 0 and row["predicted_speedup"] >= 1.0 and 0 < row["flops_share"] <= 1.0
    assert speed["prefill"][2]["predicted_speedup"] > 1.5  # 2 of 4 layers skipped in the smoke shape
    assert all(r["tokens_per_s"] > 0 for r in speed["decode"])
    d = result["sparse24"]  # off CUDA nothing converts: the notice says why and the logits are the dense model's
    assert d["masked_linears"] == 7 * gpu_check.SMOKE["layers"] and d["converted_linears"] == 0
    assert "CUDA GPU" in d["notice"] and d["max_abs_logit_diff"] == 0.0 and d["greedy_agreement"] == 1.0
    assert "(d) 2:4 sparse kernels" in printed
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file and a rename


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_sizes_need_a_gpu(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
