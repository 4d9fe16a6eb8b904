"""Without lmms-eval installed, `vlmprune lmms-eval` says how to install it (exit 2, no traceback)."""

import sys

from vlmprune.cli import main


def test_lmms_eval_missing_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval` raise ImportError
    code = main(["lmms-eval", "--model", "vlmprune", "--tasks", "fashionscenes"])
    err = capsys.readouterr().err
    assert code == 2
    assert "lmms-eval is not installed" in err and "pip install --no-deps lmms-eval==0.7.3" in err
    assert "Traceback" not in err
