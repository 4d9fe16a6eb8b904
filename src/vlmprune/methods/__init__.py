"""Pruning methods, each one file with its config dataclass, registered by name (see DESIGN.md).

Every method is usable as ``prune=`` in ``pm(...)`` / ``pm.generate(...)``; a list composes methods.
"""

from .base import Compose
from .budget import AtFlops
from .layer.random_layers import RandomLayers
from .layer.shortgpt import ShortGPT, block_influence
from .par import PAR, PARLayers, PARTokens
from .registry import METHODS, build_method, register_method
from .token.cdpruner import CDPruner
from .token.dart import DART
from .token.divprune import DivPrune
from .token.downsample import Downsample
from .token.fastv import FastV
from .token.holov import HoloV
from .token.pdrop import PDrop
from .token.pool import Pool
from .token.random import Random
from .token.sparsevlm import SparseVLM
from .token.stratified_random import StratifiedRandom
from .token.visionzip import VisionZip
from .token.vispruner import VisPruner

__all__ = ["METHODS", "AtFlops", "CDPruner", "Compose", "DART", "DivPrune", "Downsample", "FastV", "HoloV", "PAR", "PARLayers", "PARTokens", "PDrop", "Pool", "Random", "RandomLayers", "ShortGPT", "SparseVLM", "StratifiedRandom", "VisPruner", "VisionZip", "block_influence", "build_method", "register_method"]
