"""The command line: parses arguments, builds the library's objects, calls library functions."""

from __future__ import annotations

import argparse
import sys

from .errors import VlmpruneError


def _cmd_generate(args: argparse.Namespace) -> None:
    from . import load
    from .prompting import generate_answer, parse_plan, read_image

    plan = parse_plan(args.plan, args.skip)  # parse before the slow load, so bad input fails fast
    image = read_image(args.image) if args.image else None
    pm = load(args.model)
    answer, result = generate_answer(pm, args.prompt, image, prune=plan, max_new_tokens=args.max_new_tokens)
    print(answer)
    print(result.stats.summary())


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt about an image, optionally pruned")
    gen.add_argument("--model", required=True, help="checkpoint directory, 'testbed', or a hub id")
    gen.add_argument("--image", help="image file (PNG/JPEG)")
    gen.add_argument("--prompt", required=True, help="prompt text containing the processor's image placeholder")
    gen.add_argument("--plan", help='a Plan as JSON text or file, e.g. \'{"keep": {"2": [[0, 5, 9]]}, "skip": [6]}\'')
    gen.add_argument("--skip", help="comma-separated decoder layers not to run, e.g. 5,6")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="run the main job on the embedded default and print a table")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _quiet_transformers() -> None:
    """The CLI prints its own output: no weight-loading bars or backend notices from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        args.func(args)
    except VlmpruneError as err:
        print(f"vlmprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
