"""The method registry as a user meets it: a method defined in the user's own module (outside the
package) and registered with the documented call is usable by name everywhere a built-in one is
(`build_method`, ``prune=``, `AtFlops`, the sweep, the CLI through --plugin and through an installed
entry point); budgets mean one thing everywhere; --opt reaches any option; recipes fill the same
configs as flags; bad registrations and options are refused by name."""

import dataclasses
import json
import math
import sys
import textwrap

import pytest
import torch

import vlmprune
from conftest import make_batch
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.methods import registry
from vlmprune.methods.base import parse_budget
from vlmprune.methods.options import parse_options
from vlmprune.methods.registry import METHODS, build_method, register_method

PROMPT = "user : <image> what is in the image ? assistant :"
PLUGIN = '''
from dataclasses import dataclass

import torch
from vlmprune import Plan
from vlmprune.methods.base import keep_count, opt
from vlmprune.methods.registry import register_method


@register_method("{name}", kind="before", budget="keep")
@dataclass(frozen=True)
class EveryOther:
    """Keep the first `keep` of the visual tokens at even positions (a user's method)."""

    keep: float | int = opt(0.5, "visual tokens kept: a share in (0, 1] or a count")
    stride: int = opt(2, "keep every stride-th visual token")

    def decide(self, pm, prep):
        rows = []
        for n in prep.n_visual:
            picked = torch.arange(0, n, self.stride)
            rows.append(picked[: keep_count(self.keep, len(picked))] if isinstance(self.keep, int) else picked[: max(1, round(self.keep * n))])
        return Plan(keep={{0: rows}}), []
'''


def _plugin(tmp_path, monkeypatch, name, module):
    """Write the user's module registering method `name` into tmp_path, importable as `module`."""
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return name


@pytest.fixture
def user_method(tmp_path, monkeypatch):
    """A method registered by a module outside the package, unregistered afterwards."""
    name = _plugin(tmp_path, monkeypatch, "every-other", "user_methods")
    yield name, "user_methods"
    METHODS.pop(name)


def test_a_users_method_works_by_name_everywhere(user_method, tiny_models):
    name, module = user_method
    __import__(module)
    cls = METHODS[name]
    assert (cls.method_name, cls.kind, cls.budget) == (name, "before", "keep")
    model = tiny_models("llava")
    batch = make_batch("llava", model, [3, 6], [4, 2], "left")
    pm = vlmprune.wrap(model)
    method = build_method(name, keep=3)
    out = pm(**batch.kwargs(), prune=method)
    expected = [list(range(0, n, 2))[:3] for n in batch.n_visual]
    assert [r.tolist() for r in out.stats.plan.keep[0]] == expected  # the decision it made, physically applied
    # an independent reference: the same Plan written by hand gives the same logits
    ref = pm(**batch.kwargs(), prune=vlmprune.Plan(keep={0: [torch.tensor(e) for e in expected]}))
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    budget = vlmprune.AtFlops(method, share=0.6)  # AtFlops finds its budget field from the registration
    assert budget.knob == "keep" and 0 < budget.resolve(pm, pm.prepare(**batch.kwargs())).share <= 1


def test_a_users_method_runs_in_the_cli_through_plugin(user_method, checkpoint, image, capsys):
    name, module = user_method
    assert main(["--plugin", module, "methods", name]) == 0
    listed = capsys.readouterr().out
    assert name in listed and "--opt stride=" in listed and "keep every stride-th visual token" in listed
    base = ["--plugin", module, "generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT,
            "--max-new-tokens", "2", "--method", name]
    assert main(base + ["--keep", "10", "--opt", "stride=3"]) == 0
    assert "visual tokens in -> out 10 -> 10" in capsys.readouterr().out  # dropped before layer 0


def test_a_users_method_sweeps(user_method, tmp_path):
    name, module = user_method
    __import__(module)
    from vlmprune.eval.sweep import sweep

    res = sweep("testbed", [name], "0.5", tmp_path / "sweep", limit=8, latency=False)
    points = json.loads(res.results_json.read_text())["points"]
    assert {p["method"] for p in points} == {"full", name}


def test_an_installed_entry_point_registers_its_methods(tmp_path, monkeypatch):
    """A package declaring the `vlmprune.methods` entry point: its method is found by name, not imported by hand."""
    name = _plugin(tmp_path, monkeypatch, "entry-point-method", "ep_methods")
    dist = tmp_path / "ep_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlmprune.methods]\nmine = ep_methods\n")
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert name not in METHODS
        assert build_method(name, keep=0.25).keep == 0.25
        assert registry.METHODS[name].kind == "before"
    finally:
        METHODS.pop(name)


def test_bad_registrations_are_refused_by_name():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Fine:
        keep: float = 0.5

        def decide(self, pm, prep):
            return vlmprune.Plan(), []

    with pytest.raises(VlmpruneError, match="kind='tokens' is not one of before, inside, layers, hybrid"):
        register_method("x", kind="tokens")
    with pytest.raises(VlmpruneError, match="budget='tokens' is not one of keep, keep_layers"):
        register_method("x", kind="before", budget="tokens")
    with pytest.raises(VlmpruneError, match="has no such field"):
        register_method("x", kind="layers", budget="keep_layers")(Fine)
    with pytest.raises(VlmpruneError, match="must be a dataclass with decide"):
        register_method("x", kind="before")(type("NotAMethod", (), {}))
    with pytest.raises(VlmpruneError, match="'fastv' is already registered"):
        register_method("fastv", kind="inside")(Fine)
    assert "x" not in METHODS
    with pytest.raises(VlmpruneError, match=r"unknown pruning method 'nosuch'; known methods: .*fastv"):
        build_method("nosuch")


@pytest.mark.parametrize("text, value", [("0.25", 0.25), ("1.0", 1.0), ("1", 1), ("64", 64), ("1e-1", 0.1)])
def test_a_budget_means_one_thing_everywhere(text, value):
    got = parse_budget(text)
    assert got == value and type(got) is type(value)  # a plain integer is a count, a point makes a share


@pytest.mark.parametrize("text, message", [("0", "count must be >= 1"), ("1.5", r"outside \(0, 1\]"), ("abc", "takes a share")])
def test_bad_budgets_are_refused(text, message):
    with pytest.raises(VlmpruneError, match=message):
        parse_budget(text)


def test_keep_1_is_one_token_in_generate_and_refused_by_the_sweep(checkpoint, image, capsys, tmp_path):
    base = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "1"]
    assert main(base + ["--method", "pool", "--keep", "1"]) == 0
    assert "visual tokens in -> out 1 -> 1," in capsys.readouterr().out
    assert main(base + ["--method", "pool", "--keep", "1.0"]) == 0
    assert "visual tokens in -> out 144 -> 144" in capsys.readouterr().out
    assert main(["sweep", "--methods", "pool", "--keep", "0.5,1", "--out", str(tmp_path / "s"), "--limit", "4"]) == 2
    assert "is a count, but a sweep's budgets are shares" in capsys.readouterr().err


def test_layer_methods_have_valid_defaults_and_take_a_share_or_a_count(tiny_models):
    pm = vlmprune.wrap(tiny_models("llava"))
    batch = make_batch("llava", pm.model, [3, 6], [4, 2], "left")
    prep = pm.prepare(**batch.kwargs())
    n = pm.n_layers
    for cls in (vlmprune.RandomLayers, vlmprune.ShortGPT):
        method = cls()  # a valid default budget: 0.75 of the layers
        if cls is vlmprune.ShortGPT:
            method = method.calibrate(pm, [batch.kwargs()])
        assert len(method.decide(pm, prep)[0].skip.layers) == n - math.floor(0.75 * n + 0.5)  # halves round up
        share = dataclasses.replace(method, keep_layers=0.5).decide(pm, prep)[0]
        count = dataclasses.replace(method, keep_layers=n // 2).decide(pm, prep)[0]
        assert share.skip == count.skip and len(share.skip.layers) == n - n // 2


def test_opt_reaches_options_no_flag_names(checkpoint):
    """PDrop.stages, SparseVLM.recycle and VisionZip.dominant_share, from text, through the CLI's path."""
    from vlmprune.cli import _decision, build_parser

    def built(argv):
        return _decision(build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", *argv]))

    assert built(["--method", "pdrop", "--opt", "stages=0.3,0.6"]).stages == (0.3, 0.6)
    assert built(["--method", "sparsevlm", "--opt", "recycle=0.2"]).recycle == 0.2
    assert built(["--method", "visionzip", "--opt", "dominant_share=0.7"]).dominant_share == 0.7
    assert parse_options("holov", ["crops=none"]) == {"crops": None}
    assert parse_options("cdpruner", ["negate_relevance=true"]) == {"negate_relevance": True}
    with pytest.raises(VlmpruneError, match="has no option 'stride'; its options are"):
        parse_options("fastv", ["stride=2"])
    with pytest.raises(VlmpruneError, match="write NAME=VALUE"):
        parse_options("fastv", ["layer"])
    with pytest.raises(VlmpruneError, match="layer='x'"):
        parse_options("fastv", ["layer=x"])
    with pytest.raises(VlmpruneError, match="given both as a flag and as --opt"):
        built(["--method", "fastv", "--keep", "0.5", "--opt", "keep=0.25"])


def test_a_recipe_runs_what_its_flags_run(checkpoint, image, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        command: generate
        model: {checkpoint}
        image: {image}
        prompt: "{PROMPT}"
        max_new_tokens: 2
        method: pdrop
        keep: 0.25
        opt: {{stages: [0.25, 0.5]}}
        """))
    assert main(["run", str(recipe)]) == 0
    from_recipe = capsys.readouterr().out
    assert main(["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--method", "pdrop", "--keep", "0.25", "--opt", "stages=0.25,0.5"]) == 0
    assert capsys.readouterr().out == from_recipe and "layers run 8/8" in from_recipe
    recipe.write_text("command: generate\nmodel: m\nkeeep: 0.5\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "'keeep' is not an option of generate" in err and str(recipe) in err
    recipe.write_text("- just a list\n")
    assert main(["run", str(recipe)]) == 2
    assert "a recipe is a mapping with a 'command'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err


def test_the_readme_method_table_lists_every_registered_method():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    missing = [name for name in METHODS if not any(line.startswith(f"| `{name}` |") for line in rows)]
    assert not missing, f"add a row for {missing} to the README's table in 'Pruning methods'"
