"""PAR (Pruning All-Rounder): a meta-router that decides per input which visual tokens and decoder
layers to keep, trained self-supervised against the unpruned model (see README "PAR")."""

from .checkpoint import load_router, save_router
from .method import PAR, PARLayers, PARTokens
from .router import Router, RouterConfig
from .train import RouterTrainConfig, train_router

__all__ = ["PAR", "PARLayers", "PARTokens", "Router", "RouterConfig", "RouterTrainConfig", "load_router", "save_router", "train_router"]
