"""Model families. Each is one file; growth reaches them only through ``blocks`` and ``block_prefix``."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from .bert import BERT
from .gpt import GPT
from .llama import Llama

FAMILIES: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT, "llama": Llama}


def build_model(cfg: ModelConfig, n_blocks: int | None = None) -> nn.Module:
    """A freshly initialised model of ``cfg.family`` with ``n_blocks`` physical blocks (default: all)."""
    return FAMILIES[cfg.family](cfg, n_blocks=n_blocks)


__all__ = ["BERT", "FAMILIES", "GPT", "Llama", "build_model"]
