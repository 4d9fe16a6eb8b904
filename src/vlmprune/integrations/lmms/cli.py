"""``vlmprune lmms-eval ARGS``: lmms-eval's own command line with vlmprune's task folder included, and
vlmprune's errors as one line (exit code 2) instead of lmms-eval's logged traceback."""

from __future__ import annotations

import sys

from ...errors import VlmpruneError
from . import tasks_dir

INSTALL = 'pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3'


class _Abort(BaseException):
    """Carries a VlmpruneError past lmms-eval's ``except Exception`` (which logs and carries on)."""


def _import_lmms_eval():
    try:
        from lmms_eval import __main__ as lmms_main
    except ImportError as err:
        raise VlmpruneError(f"lmms-eval is not installed ({err}); install it with: {INSTALL}") from err
    return lmms_main


def run_lmms_eval(argv: list[str]) -> None:
    """Hand `argv` to lmms-eval's CLI, adding vlmprune's tasks (``fashionscenes``, ``fashionscenes_mc``) to
    ``--include_path``; with ``--model vlmprune`` the ``--model_args`` are checked first."""
    lmms_main = _import_lmms_eval()
    from lmms_eval.utils import simple_parse_args_string

    from .model import check_model_args

    saved_argv, single = sys.argv, lmms_main.cli_evaluate_single
    sys.argv = ["lmms_eval", *argv]

    def guarded(args):
        try:
            return single(args)
        except VlmpruneError as err:
            raise _Abort(err) from err

    try:
        _, args = lmms_main.parse_eval_args()
        if args.model == "vlmprune":
            check_model_args(simple_parse_args_string(args.model_args or ""))
        given = args.include_path
        args.include_path = [*([given] if isinstance(given, str) else (given or [])), str(tasks_dir())]
        lmms_main.cli_evaluate_single = guarded
        lmms_main.cli_evaluate(args)
    except _Abort as abort:
        raise abort.args[0] from None
    finally:
        sys.argv, lmms_main.cli_evaluate_single = saved_argv, single
