"""YAML recipes: one file that names a command and its options, run by ``vlmprune run recipe.yaml``.

A recipe is a mapping: ``command`` (a ``vlmprune`` subcommand: generate, eval, sweep, prune-weights,
router, ...; ``router train`` and ``testbed train`` as ``command: router train``), then the command's
options by their flag names (``max-new-tokens`` or ``max_new_tokens``). Values become the flags' text
(a list joins with commas; ``true`` sets a switch, ``false`` leaves it off), and ``opt`` holds method
options by field name (each one ``--opt NAME=VALUE``). So a recipe fills exactly the configs the flags
fill (the method dataclasses, `WeightPruneConfig`), with the same checks::

    command: generate
    model: testbed
    prompt: "<image> what is in the top left cell ?"
    image: scene.png
    method: pdrop
    keep: 0.25
    opt: {stages: [0.25, 0.5, 0.75]}

An unknown key, a non-mapping file or unreadable YAML is refused naming the file and the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import VlmpruneError


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser | None:
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return None
        parser = sub.choices[word]
    return parser


def recipe_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """The command line a recipe stands for, checked against `parser` (the ``vlmprune`` parser)."""
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError as err:
        raise VlmpruneError(f"cannot read the recipe {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise VlmpruneError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("command"), str):
        raise VlmpruneError(f"{path}: a recipe is a mapping with a 'command' (e.g. command: generate) and the command's options")
    words = recipe["command"].split()
    if words[0] == "run":
        raise VlmpruneError(f"{path}: a recipe cannot run another recipe")
    sub = _subparser(parser, words)
    if sub is None:
        raise VlmpruneError(f"{path}: command {recipe['command']!r} is not a vlmprune command; see vlmprune --help")
    flags = {s: a for a in sub._actions for s in a.option_strings if s.startswith("--")}
    argv = list(words)
    for key, value in recipe.items():
        if key == "command" or value is None:
            continue
        if key == "opt":
            if not isinstance(value, dict):
                raise VlmpruneError(f"{path}: opt is a mapping of method options, e.g. opt: {{stages: [0.25, 0.5]}}")
            argv += [f for name, v in value.items() for f in ("--opt", f"{name}={_text(v)}")]
            continue
        flag = "--" + str(key).replace("_", "-")
        action = flags.get(flag)
        if action is None:
            known = ", ".join(sorted(f[2:] for f in flags if f not in ("--help",)))
            raise VlmpruneError(f"{path}: {key!r} is not an option of {recipe['command']}; its options are {known}")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise VlmpruneError(f"{path}: {key} is a switch; write {key}: true or {key}: false")
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction) and isinstance(value, list):
            argv += [f for v in value for f in (flag, _text(v))]
        else:
            argv += [flag, _text(value)]
    return argv
