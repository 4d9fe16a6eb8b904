"""vlmprune inside lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, 0.7.3): the model
``vlmprune`` (`model.VlmpruneLMM`) and the offline FashionScenes tasks (``tasks/``).

lmms-eval finds the model through the ``lmms_eval.models`` entry point (`manifest`), so plain
``python -m lmms_eval --model vlmprune ...`` works once vlmprune is installed; ``vlmprune lmms-eval``
adds the FashionScenes tasks' folder to ``--include_path`` and hands everything else to lmms-eval.
Nothing here imports lmms-eval until it is used (it is the optional extra ``vlmprune[lmms]``).
"""

from __future__ import annotations

from pathlib import Path

MODEL_CLASS = "vlmprune.integrations.lmms.model.VlmpruneLMM"


def tasks_dir() -> Path:
    """The folder of vlmprune's lmms-eval task YAMLs (``fashionscenes``, ``fashionscenes_mc``)."""
    return Path(__file__).parent / "tasks"


def manifest():
    """The ``lmms_eval.models`` entry point: the model ``vlmprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmprune", simple_class_path=MODEL_CLASS)
