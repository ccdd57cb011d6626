"""GPT-2-style causal language model (Radford et al. 2019), in the manner of nanoGPT.

Pre-LayerNorm blocks, learned absolute positions, GELU (tanh approximation) MLP, tied input and output
embeddings, GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2 L)).
``forward`` takes an optional layer map: logical layer ``t`` runs physical block ``layer_map[t]``, so a model
with ``n`` physical blocks can run at any depth ``D`` with weight sharing; the model itself never samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .loss import head_and_loss


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is not None:  # a block run as several logical layers (--repeat-scale uses): a 0-d tensor,
            # so that compiled blocks (--compile) do not recompile for each value
            x = x + scale * self.attn(self.ln_1(x))
            return x + scale * self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    family = "gpt"
    block_prefix = "blocks"  # growth finds physical block i under "blocks.{i}."
    residual_out = ("attn.c_proj.", "mlp.c_proj.")  # block parameters that write into the residual stream

    def __init__(self, cfg: ModelConfig, n_blocks: int | None = None):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(n_blocks or cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_block(self) -> Block:
        return Block(self.config)

    def hidden(self, idx: torch.Tensor, layer_map: Sequence[int] | None = None,
               branch_scale: Sequence[float] | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the position table ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        order = range(len(self.blocks)) if layer_map is None else layer_map
        for t, i in enumerate(order):
            s = None if branch_scale is None or branch_scale[t] == 1.0 else x.new_full((), branch_scale[t])
            x = self.blocks[i](x) if s is None else self.blocks[i](x, s)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                layer_map: Sequence[int] | None = None,
                loss_chunk: int = 0, branch_scale: Sequence[float] | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab), mean cross-entropy or None); ``loss_chunk > 0`` with targets computes the loss
        that many positions at a time and returns no logits (models/loss.py). ``branch_scale[t]`` scales logical
        layer t's residual branches."""
        return head_and_loss(self.hidden(idx, layer_map, branch_scale), self.lm_head.weight, None, targets,
                             loss_chunk)

    # matrix parameters for the FLOPs count (method.md): per block, and for the output head
    def block_matmul_params(self) -> int:
        d = self.config.n_embd
        return 4 * d * d + 2 * self.config.mlp_ratio * d * d

    def head_matmul_params(self) -> int:
        return self.config.n_embd * self.config.vocab_size
