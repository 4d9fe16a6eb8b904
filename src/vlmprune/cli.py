"""The command line: parses arguments, builds the library's objects, calls library functions."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import VlmpruneError


def _budget(text: str | None, field: str = "keep") -> float | int | None:
    """'0.25' -> share 0.25, '64' -> count 64, '1.0' -> everything (`methods.base.parse_budget`)."""
    from .methods.base import parse_budget

    return None if text is None else parse_budget(text, field)


def _method_options(args: argparse.Namespace) -> dict:
    """--keep, --layer, --keep-layers, --seed, --router, --layers and every --opt NAME=VALUE, by field name."""
    from .methods.options import parse_options

    options = dict(keep=_budget(args.keep), layer=args.layer, keep_layers=_budget(args.keep_layers, "keep_layers"),
                   seed=args.seed, router=args.router, layers=args.layers)
    extra = parse_options(args.method, getattr(args, "opt", None) or [])
    both = sorted(k for k in extra if options.get(k) is not None)
    if both:
        raise VlmpruneError(f"{', '.join(both)} given both as a flag and as --opt; give it once")
    return {**options, **extra}


def _decision(args: argparse.Namespace, pm=None):
    """The --plan/--skip plan, or the --method decision (calibrating ShortGPT when asked for)."""
    from .decisions import build_decision, calibration_inputs
    from .prompting import parse_plan

    if args.method and args.plan:
        raise VlmpruneError("give either --method or --plan, not both")
    flops = getattr(args, "flops", None)
    if flops is not None and not args.method:
        raise VlmpruneError("--flops sets a method's budget; name the method with --method")
    if not args.method:
        return parse_plan(args.plan, args.skip)
    options = _method_options(args)
    if pm is None:
        return build_decision(args.method, options, flops)
    methods = build_decision(args.method, options, flops, pm, calibration=lambda pm: calibration_inputs(
        pm, args.calib, getattr(args, "calib_data", None), _read_options(args)))
    methods = methods if isinstance(methods, list) else [methods]
    skip = parse_plan(None, args.skip)
    decisions = methods + ([skip] if skip else [])
    return decisions[0] if len(decisions) == 1 else decisions


def _add_data_args(parser: argparse.ArgumentParser, what: str, folder_prompt: bool = True) -> None:
    """--data and how to read it (see `vlmprune.data.read_examples`)."""
    parser.add_argument("--data", help=f"{what}: a JSONL file of {{\"image\": PATH, \"prompt\": TEXT, \"answer\": TEXT}} rows "
                        "(image paths relative to the file), a folder of images (with --prompt), a .parquet / .csv file, "
                        "hf:NAME (a Hugging Face dataset; hf:imagefolder:DIR), or 'testbed' (FashionScenes)")
    if folder_prompt:
        parser.add_argument("--prompt", dest="data_prompt", help="the question asked about every image of a --data folder")
    parser.add_argument("--image-column", default="image", help="the column (JSON key) holding the image (default image)")
    parser.add_argument("--prompt-column", default="prompt", help="the column holding the prompt (default prompt)")
    parser.add_argument("--answer-column", default="answer", help="the column holding the reference answer (default answer)")
    parser.add_argument("--split", default="train", help="the split of a Hugging Face dataset (default train)")


def _read_options(args: argparse.Namespace) -> dict:
    return dict(prompt=getattr(args, "data_prompt", None), image_column=getattr(args, "image_column", "image"),
                prompt_column=getattr(args, "prompt_column", "prompt"), answer_column=getattr(args, "answer_column", "answer"),
                split=getattr(args, "split", "train"))


def _read_data(args: argparse.Namespace, source: str):
    from .data import read_examples

    return read_examples(source, **_read_options(args))


def _add_decision_args(parser: argparse.ArgumentParser) -> None:
    """What to prune: a hand-written plan and/or skip list, or named methods with their budget."""
    parser.add_argument("--plan", help='a Plan as JSON text or file, e.g. \'{"keep": {"2": [[0, 5, 9]]}, "skip": [6]}\'')
    parser.add_argument("--skip", help="comma-separated decoder layers not to run, e.g. 5,6")
    parser.add_argument("--method", help="pruning method name(s), comma-separated, e.g. fastv or fastv,shortgpt")
    parser.add_argument("--keep", help="visual tokens to keep: a share in (0, 1] with a point (0.25, 1.0) or a count (64)")
    parser.add_argument("--layer", type=int, help="the decoder layer a token method acts at")
    parser.add_argument("--keep-layers", help="decoder layers a layer method keeps: a share (0.75) or a count (12)")
    parser.add_argument("--opt", action="append", metavar="NAME=VALUE", help="any other option of the method, by its "
                        "field name, e.g. --opt stages=0.25,0.5,0.75 (repeatable; `vlmprune methods` lists them)")
    parser.add_argument("--seed", type=int, help="seed for random methods")
    parser.add_argument("--router", help="a trained PAR router directory for par, par-tokens, par-layers (default: testbed, the router shipped for the testbed model)")
    parser.add_argument("--layers", type=float, help="PAR: share of decoder layers kept, in (0, 1]")
    parser.add_argument("--flops", type=float, help="run the method at this share in (0, 1] of the full LM prefill "
                        "FLOPs: its --keep / --keep-layers is chosen per batch to come closest")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples for methods that need them (ShortGPT)")
    parser.add_argument("--calib-data", help="calibration data for methods that need it (ShortGPT), read like --data "
                        "(default: FashionScenes training scenes, for the testbed only)")


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    """Where the model runs and in which dtype: every command that loads a model takes these."""
    parser.add_argument("--device", help="run the whole model on cpu, cuda, cuda:N or auto (CUDA when a GPU is "
                        "visible, else the CPU); default: the CPU")
    parser.add_argument("--dtype", default="auto", help="load the weights as bfloat16, float16, float32 or auto "
                        "(the checkpoint's own dtype, the default)")
    parser.add_argument("--device-map", help="auto: split the model over the visible GPUs, then CPU memory, with "
                        "accelerate's big-model dispatch (also balanced, sequential); not together with --device")


def _add_sparse_kernels_arg(parser: argparse.ArgumentParser) -> None:
    """--sparse-kernels, for the commands that run a (pruned) model."""
    parser.add_argument("--sparse-kernels", action="store_true", help="run 2:4-pruned linears (prune-weights --nm 2:4) "
                        "on the sparse tensor cores of a CUDA GPU of compute capability 8.0+, in float16 / bfloat16; "
                        "elsewhere the model stays dense, with a notice")


def _load_kwargs(args: argparse.Namespace) -> dict:
    """--device / --dtype / --device-map as `vlmprune.load` keywords, checked now (a bad value fails before any loading)."""
    from .loading import load_options

    kwargs = dict(device=args.device, dtype=args.dtype, device_map=args.device_map)
    load_options(**kwargs)
    return {**kwargs, "sparse_kernels": True} if getattr(args, "sparse_kernels", False) else kwargs


def _cmd_generate(args: argparse.Namespace) -> None:
    from . import load
    from .prompting import generate_answer, read_image

    _decision(args)  # validate before the slow load, so bad input fails fast
    load_kwargs = _load_kwargs(args)
    image = read_image(args.image) if args.image else None
    pm = load(args.model, **load_kwargs)
    answer, result = generate_answer(pm, args.prompt, image, prune=_decision(args, pm), max_new_tokens=args.max_new_tokens)
    print(answer)
    print(result.stats.summary())
    if args.flops is not None:
        from .eval.flops import flops

        achieved = flops(pm, result.stats, vision=False).batch_share
        print(f"LM prefill FLOPs: {achieved:.3f} of the unpruned model's (target {args.flops:g})")


def _cmd_eval(args: argparse.Namespace) -> None:
    from . import load
    from .engine.plan import Plan
    from .eval.vqa import evaluate
    from .files import write_json
    from .testbed import eval_set

    decision = _decision(args)
    if isinstance(decision, Plan) and decision.batch_size is not None:
        raise VlmpruneError("eval runs many batches: give a plan without per-sample keeps (e.g. --skip), or use a method")
    load_kwargs = _load_kwargs(args)
    source = args.data or ("testbed" if str(args.model) == "testbed" else None)
    examples = None
    if source not in (None, "testbed"):
        from .data import take

        examples = take(_read_data(args, source), args.limit, "--limit", source)
    pm = load(args.model, **load_kwargs)
    if source is None:
        from .testbed.recipe import is_recipe

        if not is_recipe(pm.config, pm.processor):
            raise VlmpruneError("eval needs data for this model: pass --data FILE (JSONL rows {\"image\": PATH, \"prompt\": "
                                "TEXT, \"answer\": TEXT}, a folder of images with --prompt, a .parquet file or hf:NAME)")
        source = "testbed"
    if examples is None:  # FashionScenes: one-word answers, scored from the prefill (no decode loop)
        result = evaluate(pm, eval_set(args.limit), prune=_decision(args, pm), batch_size=args.batch_size)
        print(format_vqa(result))
        if args.json:
            write_json(args.json, result.to_dict(with_predictions=True))
        return
    from .eval.answers import evaluate_answers, format_answers

    result = evaluate_answers(pm, examples, prune=_decision(args, pm), batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)
    print(format_answers(result, args.method or "full model"))
    if args.json:
        write_json(args.json, result.to_dict(with_samples=True))


def format_vqa(result) -> str:
    lines = [f"accuracy {result.accuracy * 100:.1f}% on {result.n} questions"]
    for qtype, acc in result.per_type.items():
        lines.append(f"  {qtype:<7} {acc * 100:5.1f}%   (chance {result.chance.get(qtype, float('nan')) * 100:.1f}%)")
    lines.append(
        f"visual tokens {result.visual_tokens_in:.0f} -> {result.visual_tokens_kept:.1f}, layers run {result.layers_run:.2f}, "
        f"LM prefill {result.lm_tflops * 1e3:.3f} GFLOPs/sample, prefill {result.prefill_ms_per_sample:.2f} ms/sample"
    )
    return "\n".join(lines)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from .eval.sweep import sweep

    from .methods.options import parse_options

    options = {**({"router": args.router} if args.router else {}), **parse_options(args.methods, args.opt or [])} or None
    extra = {}
    if args.data and args.data != "testbed":
        extra["examples"] = _read_data(args, args.data)
        extra["max_new_tokens"] = args.max_new_tokens
    if args.calib_data and args.calib_data != "testbed":
        from .data import take

        extra["calibration"] = take(_read_data(args, args.calib_data), args.calib, "--calib", args.calib_data)
    res = sweep(args.model, args.methods, args.keep, args.out, limit=args.limit, batch_size=args.batch_size,
                seed=args.seed, latency=not args.no_latency, options=options, calib=args.calib,
                load_options=_load_kwargs(args), **extra)
    print(res.table_md.read_text(), end="")
    print(f"{res.computed} point(s) computed, {res.reused} reused -> {res.results_json}, {res.table_md}, {res.pareto_png}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(limit=args.limit, seed=args.seed)


def _cmd_testbed_train(args: argparse.Namespace) -> None:
    import torch

    from .eval.vqa import evaluate
    from .loading import wrap
    from .testbed.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(lr=args.lr, describe=args.describe, inventory=args.inventory, warmup=args.warmup,
                   init_from=args.init_from, turns=args.turns, drop_empty=args.drop_empty)
    overrides = {k: v for k, v in options.items() if v is not None}
    record = train(
        TrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, **overrides),
        stop_after=args.stop_after,
        evaluate=lambda model, processor, samples: evaluate(wrap(model, processor), samples, progress=False),
    )
    if record is None:
        print(f"stopped after step {args.stop_after}; state in {args.out}/state (run again to resume)")
        return
    final = record["log"][-1] if record["log"] else {}
    print(f"trained in {record['seconds'] / 60:.1f} min; held-out accuracy {final.get('accuracy', float('nan')):.3f}")
    print(f"model: {args.out}/model  record: {args.out}/training.json")


def _cmd_router_train(args: argparse.Namespace) -> None:
    import torch

    from . import load
    from .methods.par import RouterTrainConfig, train_router

    load_kwargs = _load_kwargs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(steps=args.steps, batch_size=args.batch_size, loss=args.loss, lr=args.lr, token_layer=args.token_layer,
                   width=args.width, depth=args.depth, attention_weight=args.attention_weight, response_tokens=args.response_tokens)
    cfg = RouterTrainConfig(out=args.out, model=args.model, data=str(args.data or "testbed"), tokens=args.tokens,
                            layers=args.layers, seed=args.seed,
                            sample_budgets=not args.fixed_budget, **{k: v for k, v in options.items() if v is not None})
    pm = load(args.model, **load_kwargs)
    record = train_router(cfg, pm=pm, stop_after=args.stop_after, batches=_router_batches(args, cfg, pm))
    if record is None:
        print(f"stopped after step {args.stop_after}; state in {args.out}/state (run again to resume)")
        return
    last = record["log"][-1]
    print(f"trained in {record['seconds'] / 60:.1f} min; last {cfg.log_every} steps: router KL {last['router_kl']:.4f}, "
          f"candidates' mean KL {last['mean_kl']:.4f}")
    print(f"router: {args.out} (router.safetensors, router.json); use it with --method par --router {args.out}")


def _router_batches(args: argparse.Namespace, cfg, pm) -> list[dict] | None:
    """Training batches of `cfg.batch_size` prompts from --data (cycled); None: FashionScenes training
    scenes, the default for the testbed only."""
    from .data import example_batches, image_channels
    from .testbed.recipe import is_recipe

    if not args.data or args.data == "testbed":
        if not is_recipe(pm.config, pm.processor):
            raise VlmpruneError("router training needs prompts for this model: pass --data FILE (JSONL rows {\"image\": "
                                "PATH, \"prompt\": TEXT}, a folder of images with --prompt, a .parquet file or hf:NAME)")
        return None
    examples = _read_data(args, args.data)
    return example_batches(pm.processor, examples, cfg.batch_size, image_channels(pm.config))


def _cmd_prune_weights(args: argparse.Namespace) -> None:
    from .weights import calibration_batches, check_out_dir, config_from, load_for_pruning, prune_weights, save_pruned

    config = config_from(vars(args))  # every WeightPruneConfig field by name: one flag each (_add_config_args)
    check_out_dir(args.out, args.overwrite)  # validate before the slow load, so bad input fails fast
    model, processor = load_for_pruning(args.model, **_load_kwargs(args))
    batches = calibration_batches(model, processor, args.calib, seed=config.seed, data=args.data, read_options=_read_options(args))
    report = prune_weights(model, batches, config)
    out = save_pruned(model, processor, report, args.out, overwrite=args.overwrite)
    print(report.summary())
    print(f"pruned checkpoint: {out} (report: sparsity.json)")


def _add_config_args(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass (``--zeroth-mode`` for ``zeroth_mode``, dest the field's
    name), with the field's ``metadata["help"]`` and ``metadata["parse"]``; not given: None, which
    leaves the field's default."""
    for field in dataclasses.fields(config_class):
        default = "" if field.default is None or "default" in field.metadata["help"] else f" (default {field.default})"
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=field.metadata.get("parse", str),
                            help=field.metadata["help"] + default)


def _cmd_methods(args: argparse.Namespace) -> None:
    from .methods.options import methods_table
    from .methods.registry import METHODS, load_entry_points

    load_entry_points()
    names = [n.strip() for n in (args.names or "").split(",") if n.strip()] or list(METHODS)
    print(methods_table(names), end="")


def _cmd_run(args: argparse.Namespace) -> None:
    from .recipes import recipe_argv

    argv = recipe_argv(args.recipe, build_parser())
    print("vlmprune " + " ".join(argv), file=sys.stderr)
    sub = build_parser().parse_args(argv)
    sub.func(sub)


def load_plugins(modules: list[str] | None) -> None:
    """Import each --plugin module (its register_method / register_family / register_pruner calls run)."""
    import importlib

    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise VlmpruneError(f"--plugin {name}: cannot import it ({err}); give an importable module name "
                                "(on PYTHONPATH or installed)") from err


def _cmd_lmms_eval(args: argparse.Namespace) -> None:
    from .integrations.lmms.cli import run_lmms_eval

    run_lmms_eval(args.lmms_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description=__doc__)
    parser.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE first, so the methods, "
                        "families and weight kernels it registers are usable by name (repeatable; installed packages "
                        "can instead declare a 'vlmprune.methods' entry point)")
    sub = parser.add_subparsers(dest="command", required=True)

    methods = sub.add_parser("methods", help="list the registered pruning methods: kind, budget and options")
    methods.add_argument("names", nargs="?", help="comma-separated names (default: all)")
    methods.set_defaults(func=_cmd_methods)

    run = sub.add_parser("run", help="run a YAML recipe: {command: generate | eval | sweep | prune-weights | ..., and its options}")
    run.add_argument("recipe", help="a .yaml file (see the README's 'Recipes')")
    run.set_defaults(func=_cmd_run)

    gen = sub.add_parser("generate", help="answer a prompt about an image, optionally pruned")
    gen.add_argument("--model", required=True, help="checkpoint directory, 'testbed', or a hub id")
    gen.add_argument("--image", help="image file (PNG/JPEG)")
    gen.add_argument("--prompt", required=True, help="prompt text containing the processor's image placeholder")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    _add_decision_args(gen)
    _add_device_args(gen)
    _add_sparse_kernels_arg(gen)
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="answers on your data (--data) or accuracy on the shipped FashionScenes evaluation set")
    ev.add_argument("--model", default="testbed", help="checkpoint directory or 'testbed'")
    _add_data_args(ev, "the samples to answer (default: FashionScenes' evaluation set, for the testbed only)")
    ev.add_argument("--limit", type=int, help="evaluate the first N samples only")
    ev.add_argument("--json", help="also write the result, with every sample's answer, as JSON to this file")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer on --data (default 32)")
    _add_decision_args(ev)
    _add_device_args(ev)
    _add_sparse_kernels_arg(ev)
    ev.set_defaults(func=_cmd_eval)

    testbed = sub.add_parser("testbed", help="the embedded default: train the FashionScenes LLaVA")
    testbed_sub = testbed.add_subparsers(dest="testbed_command", required=True)
    tr = testbed_sub.add_parser("train", help="train from scratch (resumes from OUT/state if present)")
    tr.add_argument("--out", default="runs/testbed", help="output directory (model, state, training.json)")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 8e-4)")
    tr.add_argument("--warmup", type=int, help="warm-up steps (default 100)")
    tr.add_argument("--describe", type=float, help="share of each batch on the describe task (default 0.15)")
    tr.add_argument("--inventory", type=float, help="share of each batch on the inventory task (default 0.15)")
    tr.add_argument("--init-from", help="start from this trained model directory (a second stage)")
    tr.add_argument("--turns", type=int, help="questions per training image (default 4)")
    tr.add_argument("--drop-empty", type=float, help="share of scenes trained without their empty cells' visual tokens (default 0)")
    tr.add_argument("--stop-after", type=int, help="stop (saving the state) after this many steps")
    tr.set_defaults(func=_cmd_testbed_train)

    sw = sub.add_parser("sweep", help="methods x budgets on FashionScenes: results.json, table.md, pareto.png (resumable)")
    sw.add_argument("--model", default="testbed", help="checkpoint directory or 'testbed'")
    sw.add_argument("--methods", required=True, help="comma-separated method names, e.g. fastv,pdrop,shortgpt")
    sw.add_argument("--keep", required=True, help="comma-separated budgets in (0, 1]: visual-token share for token "
                    "methods, decoder-layer share for layer methods, e.g. 0.5,0.25,0.11")
    sw.add_argument("--out", required=True, help="output directory; a re-run with the same arguments reuses finished points")
    sw.add_argument("--limit", type=int, help="evaluate the first N questions only")
    sw.add_argument("--batch-size", type=int, default=32)
    sw.add_argument("--seed", type=int, default=0, help="seed for random methods")
    sw.add_argument("--no-latency", action="store_true", help="skip the latency and memory measurement")
    sw.add_argument("--router", help="a trained PAR router directory (for par, par-tokens, par-layers)")
    sw.add_argument("--opt", action="append", metavar="NAME=VALUE", help="another option of the methods, by field name "
                    "(repeatable), e.g. --opt stages=0.25,0.5,0.75")
    _add_data_args(sw, "the samples to answer (default: FashionScenes' evaluation set, for the testbed only)")
    sw.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer on --data (default 32)")
    sw.add_argument("--calib", type=int, default=64, help="calibration samples for methods that need them (ShortGPT)")
    sw.add_argument("--calib-data", help="calibration data for ShortGPT, read like --data (default: FashionScenes "
                    "training scenes, for the testbed only)")
    _add_device_args(sw)
    _add_sparse_kernels_arg(sw)
    sw.set_defaults(func=_cmd_sweep)

    pw = sub.add_parser("prune-weights", help="prune weights (allocation x local pruner) and save a transformers checkpoint")
    pw.add_argument("--model", required=True, help="checkpoint directory (a supported VLM or a causal LM), a .gguf file "
                    "(causal LM, pip install -e '.[gguf]') or 'testbed'")
    from .weights import WeightPruneConfig

    _add_config_args(pw, WeightPruneConfig)
    pw.add_argument("--calib", type=int, default=64, help="calibration samples: rows of --data (for a causal LM, 128-token "
                    "slices of its text); by default FashionScenes training scenes for the testbed, CPython's pydoc "
                    "topics for a causal LM")
    _add_data_args(pw, "calibration data (a VLM other than the testbed needs it; a causal LM reads a text file or "
                   "JSONL {\"text\": ...} rows)")
    pw.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    pw.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_device_args(pw)
    pw.set_defaults(func=_cmd_prune_weights)

    router = sub.add_parser("router", help="PAR: train the meta-router that picks visual tokens and layers")
    router_sub = router.add_subparsers(dest="router_command", required=True)
    rt = router_sub.add_parser("train", help="self-supervised training (resumes from OUT/state if present)")
    rt.add_argument("--model", default="testbed", help="checkpoint directory or 'testbed' (FashionScenes training scenes)")
    _add_data_args(rt, "training prompts (images + questions; answers are not used: the model's own response is the "
                   "teacher). Default: FashionScenes training scenes, for the testbed only")
    rt.add_argument("--tokens", type=float, default=0.25, help="share of visual tokens kept the router is trained for")
    rt.add_argument("--layers", type=float, default=0.75, help="share of decoder layers kept the router is trained for")
    rt.add_argument("--fixed-budget", action="store_true", help="train at --tokens/--layers only (default: sample budgets too)")
    rt.add_argument("--loss", help="preference (default) or distill (the ablation)")
    rt.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    rt.add_argument("--batch-size", type=int, help="scenes per step (default 8)")
    rt.add_argument("--lr", type=float, help="learning rate (default 3e-3)")
    rt.add_argument("--token-layer", type=int, help="decoder layer K: the router reads its input hidden states and dropped visual tokens are gone from it on (default 1)")
    rt.add_argument("--width", type=int, help="router width (default 64)")
    rt.add_argument("--depth", type=int, help="router transformer layers (default 1)")
    rt.add_argument("--attention-weight", type=float, help="weight of the auxiliary distillation of the teacher's layer-1 attention into the token logits (default 1; 0: preference only)")
    rt.add_argument("--response-tokens", type=int, help="the teacher is the frozen model's greedy response of up to N tokens (stopping at EOS; generated once per batch, cached in OUT/teacher); each flow's KL is averaged over them (default 32; 1: the first answer token only)")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    rt.add_argument("--stop-after", type=int, help="stop (saving the state) after this many steps")
    rt.add_argument("--out", required=True, help="output directory (router.safetensors, router.json, state/)")
    _add_device_args(rt)
    rt.set_defaults(func=_cmd_router_train)

    lmms = sub.add_parser("lmms-eval", help="run lmms-eval with the vlmprune model and the offline FashionScenes tasks; "
                          "every argument goes to lmms-eval unchanged", add_help=False)
    lmms.add_argument("lmms_args", nargs=argparse.REMAINDER, help="lmms-eval's own arguments, e.g. --model vlmprune "
                      "--model_args pretrained=testbed,method=fastv,keep=0.25 --tasks fashionscenes --output_path DIR")
    lmms.set_defaults(func=_cmd_lmms_eval)

    demo = sub.add_parser("demo", help="run the main job on the embedded default and print a table")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--limit", type=int, default=300, help="evaluation questions to use")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _quiet_transformers() -> None:
    """The CLI prints its own output: no weight-loading bars or backend notices from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmms-eval"] and argv[1:2] not in (["-h"], ["--help"]):  # lmms-eval parses its own options
        args = argparse.Namespace(func=_cmd_lmms_eval, lmms_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        load_plugins(getattr(args, "plugin", None))
        args.func(args)
    except VlmpruneError as err:
        print(f"vlmprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
