"""Sweeps: every method at every budget (and the full model once) on FashionScenes, with the runs'
accounting and latency, written to ``results.json``, ``table.md`` and ``pareto.png``.

    from vlmprune.eval.sweep import sweep
    res = sweep("testbed", ["fastv", "pdrop", "shortgpt"], [0.5, 0.25, 0.11], "runs/sweep", limit=500)
    res.points[0]["accuracy"], res.points[0]["lm_tflops"]           # the full model comes first

**Budgets.** One ``keep`` value in (0, 1] drives every method through the registry, by the budget
field its config dataclass has: a token method (a ``keep`` field: fastv, pdrop, sparsevlm, visionzip,
random, stratified-random, pool, ...) gets ``keep`` as its visual-token ratio; a layer method (a
``keep_layers`` field: shortgpt, random-layers) keeps ``max(1, round(keep * n_layers))`` decoder
layers (halves round up). A method that needs calibration (a ``calibrate`` method: ShortGPT) is
calibrated once per sweep, on `calib` FashionScenes *training* scenes (seed 12345; never the
evaluation split) unless `calibration` samples are given, and that calibration serves every budget
(Block Influence does not depend on it).

**Resuming.** ``results.json`` is rewritten atomically (temporary file + rename) after every point, so
an interrupted sweep never leaves a half-written file and a re-run resumes: a point whose key
(method, keep, options, limit, model, data) is already there is reused, not recomputed. ``model`` is
the name given plus a fingerprint (of ``config.json`` and the safetensors files' names, sizes and
modification times for a directory; of the config and the parameters for a loaded model), so a
retrained checkpoint at the same path is not mistaken for the old one. Points of other sweeps in the
same file are kept; ``table.md`` and ``pareto.png`` show the points of this sweep only.

Each point records `evaluate`'s `VQAResult` (accuracy, per question type, visual tokens, layers run,
LM prefill TFLOPs per sample, batched prefill ms per sample), the FLOPs share of the full model's,
the method's applied config, and -- with `latency` -- `measure_latency` on one fixed batch (the first
`latency_batch` evaluation samples): time to first token, per-token decode, peak memory, KV bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..errors import VlmpruneError
from ..data import Example, example_batches, image_channels
from ..data.calibration import CALIBRATION_SEED
from ..methods.base import layer_count
from ..methods.budget import budget_field
from ..methods.protocols import Calibrates
from ..files import write_json
from ..pruned_model import PrunedModel
from .latency import measure_latency
from .vqa import evaluate

FULL = "full"  # the unpruned model's point
KEY_FIELDS = ("method", "keep", "options", "limit", "model", "data")
FORMAT_VERSION = 1


@dataclass
class SweepResult:
    points: list[dict]  # this sweep's points, the full model first, then methods x keeps in the order given
    computed: int  # points evaluated (or completed with latency) in this call
    reused: int  # points taken from results.json as they were
    results_json: Path
    table_md: Path
    pareto_png: Path


@dataclass(frozen=True)
class _Spec:
    method: str
    keep: float
    options: dict  # the method's options besides its budget (seed, calibration source, ...)


def sweep(
    model: str | os.PathLike | PrunedModel,
    methods: str | Sequence[str],
    keeps: str | Sequence[float],
    out_dir: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    latency: bool = True,
    *,
    samples: Sequence | None = None,
    options: dict[str, Any] | None = None,
    calib: int = 64,
    calibration: Sequence | None = None,
    latency_batch: int = 1,
    latency_repeats: int = 5,
    decode_tokens: int = 8,
    examples: Sequence | None = None,
    max_new_tokens: int = 32,
    load_options: dict[str, Any] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep and write ``out_dir/{results.json, table.md, pareto.png}``.

    `model`: a checkpoint directory, ``"testbed"``, or a loaded `PrunedModel` (loaded lazily: a sweep
    whose points are all done does not load it). `methods`: registered names (list or comma-separated).
    `keeps`: budgets in (0, 1] (list or comma-separated; see the module docstring for their meaning).
    `samples`: FashionScenes samples to evaluate instead of the shipped evaluation set (`limit` still
    takes the first N). `seed` goes to methods with a ``seed`` field; `options` (e.g. ``{"layer": 3}``)
    to the methods whose config has that field. `calib` / `calibration`: calibration scenes (count of
    training scenes, the samples themselves, or model-input batches) for methods that calibrate.
    `examples`: a user's `vlmprune.data.Example` rows instead of FashionScenes: each point generates
    up to `max_new_tokens` (`eval.answers.evaluate_answers`; the full model's responses are computed
    once) and its ``accuracy`` is the normalised exact match where the rows have answers, otherwise the
    agreement with the full model (``metric`` says which). `load_options`: `vlmprune.load` keywords
    (``device``, ``dtype``, ``device_map``, ``max_memory``, ``offload_folder``) for a `model` given by
    name; a ``dtype`` other than auto joins the points' model key (it changes the results).
    """
    from ..methods import registry

    names = _split(methods, "methods")
    keep_values = _parse_keeps(keeps)
    options = dict(options or {})
    classes = {name: _method_class(registry, name) for name in names}
    _check_options(options, classes)
    if batch_size < 1 or latency_batch < 1:
        raise VlmpruneError(f"batch sizes must be >= 1, got batch_size={batch_size}, latency_batch={latency_batch}")
    _require_matplotlib()

    if examples is not None:
        samples, data_id = _examples(examples, limit)
    else:
        samples, data_id = _samples(samples, limit)
    load_options = _check_load_options(model, load_options)
    model_id = _model_id(model) + _dtype_suffix(load_options) + (":sparse-kernels" if load_options.get("sparse_kernels") else "")
    calib_id = calib if calibration is None else _calibration_id(calibration)
    specs = [_Spec(FULL, 1.0, {})]
    for name in names:
        accepted = {f.name for f in fields(classes[name]) if f.init}
        mine = {k: v for k, v in {"seed": seed, **options}.items() if k in accepted}
        if issubclass(classes[name], Calibrates):
            mine["calib"] = calib_id
        specs += [_Spec(name, keep, mine) for keep in keep_values]

    out = Path(out_dir)
    results_path = out / "results.json"
    store = _read_results(results_path)
    runner = _Runner(model, samples, classes, calib, calibration, batch_size, latency_batch, latency_repeats, decode_tokens)
    runner.user_data, runner.max_new_tokens = examples is not None, max_new_tokens
    runner.load_options = load_options
    points, computed, reused = [], 0, 0
    bar = tqdm(specs, desc="sweep", unit="point", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(f"{spec.method} keep={spec.keep:g}")
        base = dict(method=spec.method, keep=spec.keep, options=spec.options, limit=limit, model=model_id, data=data_id)
        if examples is not None:
            base["max_new_tokens"] = max_new_tokens
        point = store.get(_key(base))
        want_latency = latency and (point is None or point.get("latency") is None)
        if point is not None and not want_latency:
            reused += 1
        else:
            point = dict(point or base)
            runner.complete(point, spec, want_latency, full=points[0] if points else None)
            store[_key(point)] = point
            write_json(results_path, {"version": FORMAT_VERSION, "points": list(store.values())})
            computed += 1
        points.append(point)
    bar.close()

    what = "FashionScenes" if examples is None else data_id.split(":")[0]
    table_path = _write_text(out / "table.md", format_table(points, model_id, len(samples), what))
    plot_path = plot_pareto(points, out / "pareto.png", title=f"{model_id.split('@')[0]}: {what}, {len(samples)} samples")
    return SweepResult(points, computed, reused, results_path, table_path, plot_path)


class _Runner:
    """Loads the model, builds (and calibrates) methods and measures points, all on first need."""

    def __init__(self, model, samples, classes, calib, calibration, batch_size, latency_batch, latency_repeats, decode_tokens):
        self.model, self.samples, self.classes = model, samples, classes
        self.calib, self.calibration = calib, calibration
        self.batch_size, self.latency_batch = batch_size, latency_batch
        self.latency_repeats, self.decode_tokens = latency_repeats, decode_tokens
        self.calibrated: dict[str, Any] = {}
        self.user_data, self.max_new_tokens, self._reference = False, 32, None
        self._pm: PrunedModel | None = model if isinstance(model, PrunedModel) else None
        self.load_options: dict[str, Any] = {}  # vlmprune.load keywords (device, dtype, device_map)

    @property
    def pm(self) -> PrunedModel:
        if self._pm is None:
            from ..loading import load

            self._pm = load(self.model, **self.load_options)
        return self._pm

    def build(self, spec: _Spec):
        """The method of `spec` at its budget (None for the full model)."""
        from ..methods import registry

        if spec.method == FULL:
            return None
        n_layers = self.pm.n_layers
        budget = (
            {"keep_layers": layer_count(spec.keep, n_layers)}
            if _is_layer_method(self.classes[spec.method])
            else {"keep": spec.keep}
        )
        if spec.method in self.calibrated:  # one calibration serves every budget
            return replace(self.calibrated[spec.method], **budget)
        opts = {k: v for k, v in spec.options.items() if k != "calib"}
        method = registry.build_method(spec.method, **opts, **budget)
        if isinstance(method, Calibrates):
            method = method.calibrate(self.pm, self._calibration_batches())
            self.calibrated[spec.method] = method
        return method

    def _calibration_batches(self) -> list[dict]:
        from ..data.calibration import scene_batches
        from ..testbed.encode import encode_batches

        if self.calibration is not None and all(isinstance(c, dict) for c in self.calibration):
            return list(self.calibration)  # model-input batches
        if self.calibration is not None and all(isinstance(c, Example) for c in self.calibration):  # --calib-data rows
            return example_batches(self.pm.processor, list(self.calibration), 16, image_channels(self.pm.config), with_answer=True)
        if self.calibration is None and self.user_data:
            raise VlmpruneError("a sweep on your data calibrates ShortGPT on your data too: pass --calib-data FILE")
        if self.calibration is not None:  # FashionScenes samples
            return encode_batches(self.calibration, self.pm.processor.tokenizer)
        return scene_batches(self.pm.processor.tokenizer, self.calib, seed=CALIBRATION_SEED)

    def complete(self, point: dict, spec: _Spec, want_latency: bool, full: dict | None) -> None:
        """Fill in what `point` lacks: the evaluation (if not there yet) and the latency (if wanted)."""
        method = self.build(spec)
        pm = self.pm
        if "accuracy" not in point:
            start = time.perf_counter()
            if self.user_data:
                self._evaluate_answers(point, method)
            else:
                result = evaluate(pm, self.samples, prune=method, batch_size=self.batch_size, progress=False)
                point.update(result.to_dict())
            point["seconds"] = time.perf_counter() - start
            point["config"] = _jsonable(asdict(method)) if is_dataclass(method) else None
            point["n_layers"] = pm.n_layers
            reference = point if full is None else full
            point["flops_share"] = point["lm_tflops"] / reference["lm_tflops"]
            point.setdefault("latency", None)
        if want_latency:
            from ..data import encode_examples, image_channels
            from ..testbed.encode import encode

            device = pm.input_device  # (a parameter's device can be meta under a device_map's offload)
            batch = self.samples[: self.latency_batch]
            if self.user_data:
                inputs = encode_examples(pm.processor, batch, image_channels(pm.config))
            else:
                inputs = encode(batch, pm.processor.tokenizer)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            lat = measure_latency(pm, inputs, prune=method, decode_tokens=self.decode_tokens, repeats=self.latency_repeats)
            point["latency"] = lat.to_dict()
        point["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


    def _evaluate_answers(self, point: dict, method) -> None:
        from .answers import evaluate_answers, full_responses

        if self._reference is None:
            self._reference = full_responses(self.pm, self.samples, self.batch_size, self.max_new_tokens, progress=False)
        result = evaluate_answers(self.pm, self.samples, method, self.batch_size, self.max_new_tokens, self._reference,
                                  progress=False)
        point.update(result.to_dict(with_samples=False))
        point["metric"] = "agreement" if result.accuracy is None else "accuracy"
        point["accuracy"] = result.agreement if result.accuracy is None else result.accuracy


def format_table(points: Sequence[dict], model_id: str = "", n: int | None = None, data: str = "FashionScenes") -> str:
    """A markdown table of sweep points: one row per point, in the order given."""
    qtypes = sorted({q for p in points for q in p.get("per_type", {})})
    metric = next((p["metric"] for p in points if "metric" in p), "accuracy")
    head = ["method", "keep", metric, *qtypes, "visual tokens", "layers", "TFLOPs", "FLOPs share", "prefill ms"]
    lines = []
    if model_id:
        lines.append(f"{data} {metric} of `{model_id}`" + (f" on {n} samples" if n else "") + ".\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for p in points:
        lat = p.get("latency")
        row = [
            p["method"],
            f"{p['keep']:g}",
            f"{p['accuracy'] * 100:.1f}%",
            *(f"{p['per_type'][q] * 100:.1f}%" if q in p.get("per_type", {}) else "" for q in qtypes),
            f"{p['visual_tokens_kept']:.1f}",
            f"{p['layers_run']:.2f}",
            f"{p['lm_tflops']:.4g}",
            f"{p['flops_share']:.3f}",
            f"{lat['prefill_ms']:.1f}" if lat else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(points: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy vs LM prefill TFLOPs: one line per method, the full model as a star and a reference line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    by_method: dict[str, list[dict]] = {}
    for p in points:
        if p["method"] != FULL:
            by_method.setdefault(p["method"], []).append(p)
    markers = "osD^vP*Xh<>"  # colours repeat after ten lines; the marker keeps every method distinct
    for i, (method, pts) in enumerate(by_method.items()):
        pts = sorted(pts, key=lambda p: p["lm_tflops"])
        x, y = [p["lm_tflops"] for p in pts], [p["accuracy"] * 100 for p in pts]
        style = "-" if i < 10 else "--"
        (line,) = ax.plot(x, y, marker=markers[i % len(markers)], linestyle=style, label=method)
        for p, xi, yi in zip(pts, x, y):
            ax.annotate(f"{p['keep']:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6, color=line.get_color())
    for p in points:
        if p["method"] == FULL:
            ax.axhline(p["accuracy"] * 100, color="black", linestyle=":", linewidth=1)
            ax.plot([p["lm_tflops"]], [p["accuracy"] * 100], marker="*", markersize=14, color="black", linestyle="none", label="full model")
    ax.set_xlabel("language-model prefill TFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=130)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _key(point: dict) -> str:
    return json.dumps({k: point[k] for k in KEY_FIELDS}, sort_keys=True)


def _read_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
        return {_key(p): p for p in stored["points"]}
    except (ValueError, KeyError, TypeError) as err:
        raise VlmpruneError(f"{path} is not a vlmprune sweep results file ({err}); move it away or pick another --out") from err


def _split(text: str | Sequence[str], what: str) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise VlmpruneError(f"give at least one of --{what}")
    return list(dict.fromkeys(items))


def _parse_keeps(keeps: str | Sequence[float]) -> list[float]:
    """The sweep's budgets: shares in (0, 1]. A plain integer ("1", or an int) is a count everywhere
    else in vlmprune (`methods.base.parse_budget`), so it is refused here rather than read as a share."""
    out = []
    for item in _split(keeps, "keep"):
        if isinstance(item, int) or str(item).strip().lstrip("+").isdigit():
            raise VlmpruneError(f"--keep {item!r} is a count, but a sweep's budgets are shares in (0, 1]: write "
                                f"{float(item)!r} for a share (1.0 = everything), e.g. --keep 0.5,0.25,1.0")
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise VlmpruneError(f"--keep takes shares in (0, 1] (the visual-token share, or the layer share for layer methods), got {item!r}")
        out.append(value)
    return list(dict.fromkeys(out))


def _method_class(registry, name: str) -> type:
    return registry.method_class(name)  # an unknown name: the registry's error lists the known methods


def _is_layer_method(cls: type) -> bool:
    return budget_field(cls) == "keep_layers"


def _check_options(options: dict, classes: dict[str, type]) -> None:
    budget = {"keep", "keep_layers"} & set(options)
    if budget:
        raise VlmpruneError(f"the sweep sets each method's budget from `keeps`; do not pass {sorted(budget)} as options")
    for name, cls in classes.items():
        if getattr(cls, "budget", "keep") is None:
            raise VlmpruneError(f"method {name!r} has no budget field (it registered budget=None), so a sweep cannot vary it")
        budget_field(cls)  # a clear error for an unregistered class with neither field
    taken = {f.name for cls in classes.values() for f in fields(cls)}
    unused = set(options) - taken
    if unused:
        raise VlmpruneError(f"option(s) {sorted(unused)} are not taken by any of {sorted(classes)}")


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise VlmpruneError("the sweep draws pareto.png with matplotlib: pip install -e '.[plots]'")


def _samples(samples: Sequence | None, limit: int | None) -> tuple[list, str]:
    if samples is None:
        from ..testbed import eval_set

        return eval_set(limit), "fashionscenes-eval"
    if limit is not None and limit < 1:
        raise VlmpruneError(f"--limit must be >= 1, got {limit}")
    chosen = list(samples)[:limit]
    if not chosen:
        raise VlmpruneError("the sweep got no samples to evaluate")
    return chosen, "samples:" + _samples_digest(chosen)


def _examples(examples: Sequence, limit: int | None) -> tuple[list, str]:
    """A user's rows (the first `limit`) and an id naming their source file and content."""
    if limit is not None and limit < 1:
        raise VlmpruneError(f"--limit must be >= 1, got {limit}")
    chosen = list(examples)[:limit]
    if not chosen:
        raise VlmpruneError("the sweep got no samples to evaluate")
    h = hashlib.sha256()
    for ex in chosen:
        h.update(f"{ex.origin}\0{ex.prompt}\0{ex.answer}\0".encode())
        if ex.image is not None:
            h.update(ex.image.tobytes())
    source = chosen[0].origin.rsplit(" row ", 1)[0].rsplit(" image ", 1)[0]
    return chosen, f"{Path(source).name or source}:{h.hexdigest()[:16]}"


def _calibration_id(calibration: Sequence) -> str:
    if all(isinstance(c, Example) for c in calibration):
        return "examples:" + _examples(calibration, None)[1]
    if all(isinstance(c, dict) for c in calibration):
        h = hashlib.sha256()
        for batch in calibration:
            for key in sorted(batch):
                h.update(key.encode())
                h.update(batch[key].numpy().tobytes())
        return "batches:" + h.hexdigest()[:16]
    return "samples:" + _samples_digest(calibration)


def _samples_digest(samples: Sequence) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.question}\0{s.answer}\0".encode())
        h.update(s.image.tobytes())
    return h.hexdigest()[:16]


def _check_load_options(model, load_options: dict[str, Any] | None) -> dict[str, Any]:
    """`load_options` checked now (before any point runs); they apply only to a model loaded by name."""
    from ..loading import load_options as check

    options = {k: v for k, v in dict(load_options or {}).items() if v is not None}
    if not options:
        return {}
    if isinstance(model, PrunedModel):
        raise VlmpruneError("load_options apply when the sweep loads the model by name; this model is already loaded")
    unknown = set(options) - {"device", "dtype", "device_map", "max_memory", "offload_folder", "sparse_kernels"}
    if unknown:
        raise VlmpruneError(f"unknown load_options {sorted(unknown)}; vlmprune.load takes device, dtype, device_map, "
                            "max_memory, offload_folder, sparse_kernels")
    check(**{k: v for k, v in options.items() if k != "sparse_kernels"})
    return options


def _dtype_suffix(load_options: dict[str, Any]) -> str:
    """'' for the checkpoint's own dtype, else ``:bfloat16`` and the like (part of the points' model key)."""
    from ..loading import resolve_dtype

    dtype = resolve_dtype(load_options.get("dtype"))
    return "" if dtype == "auto" else ":" + str(dtype).removeprefix("torch.")


def _model_id(model: str | os.PathLike | PrunedModel) -> str:
    """``name@fingerprint``: the name given, and a digest of the weights it stands for."""
    h = hashlib.sha256()
    if isinstance(model, PrunedModel):
        name = getattr(model.config, "_name_or_path", "") or type(model.model).__name__
        h.update(model.config.to_json_string().encode())
        for pname, tensor in model.model.state_dict().items():  # name, shape and leading values of each
            h.update(f"{pname}{tuple(tensor.shape)}{tensor.dtype}".encode())
            if tensor.device.type != "meta":  # offloaded by a device_map: name, shape and dtype only
                h.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
        return f"{name}@{h.hexdigest()[:12]}"
    name = str(model)
    if name == "testbed":
        from ..testbed import checkpoint_dir

        path = checkpoint_dir()
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        return name  # a hub id: nothing local to fingerprint
    h.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        st = weights.stat()
        h.update(f"{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{name}@{h.hexdigest()[:12]}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
