"""vlmprune's own accounting beside lmms-eval's results: ``vlmprune_stats.json`` and a one-line summary."""

from __future__ import annotations

import sys
from pathlib import Path

from ...eval.accounting import RunTotals
from ...files import write_json

STATS_NAME = "vlmprune_stats.json"


def stats_path_from_argv(argv: list[str] | None = None) -> Path | None:
    """``OUTPUT_PATH/vlmprune_stats.json`` from lmms-eval's ``--output_path`` on the command line (its parent
    folder when it names a file), or None."""
    argv = sys.argv if argv is None else argv
    value = None
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--output_path="):
            value = arg.split("=", 1)[1]
    if value is None:
        return None
    path = Path(value)
    return (path.parent if path.suffix in (".json", ".jsonl") else path) / STATS_NAME


def summary_line(totals: RunTotals) -> str:
    m = totals.means()
    return (f"{totals.samples} requests: visual tokens {m['visual_tokens_in']:.1f} -> {m['visual_tokens_kept']:.1f}, "
            f"layers run {m['layers_run']:.2f}, LM prefill {m['lm_tflops'] * 1e3:.4f} GFLOPs ({m['lm_share']:.3f} of full), "
            f"total {m['tflops'] * 1e3:.4f} GFLOPs, prefill {m['prefill_ms_per_sample']:.2f} ms/sample, "
            f"decode {m['decode_ms_per_token']:.2f} ms/token")


class StatsWriter:
    """Writes the accounting (atomically) to `path`, or to the default from the command line."""

    def __init__(self, path: str | None, config: dict):
        self.path = Path(path) if path else stats_path_from_argv()
        self.config = config

    def write(self, totals: dict[str, RunTotals], processes: int) -> Path | None:
        """``config``, ``processes``, the totals and means of each request type (``generate_until``,
        ``loglikelihood``) and of ``all`` requests."""
        if self.path is None:
            return None
        by_type = {kind: t.to_dict() for kind, t in sorted(totals.items())}
        everything = sum(totals.values(), RunTotals()).to_dict()
        return write_json(self.path, dict(config=self.config, processes=processes, requests=by_type, all=everything))
