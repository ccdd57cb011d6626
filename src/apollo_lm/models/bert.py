"""BERT-style masked language model (Devlin et al. 2019).

Post-LayerNorm blocks, word + position + token-type embeddings with LayerNorm, exact GELU MLP, and the MLM
head (dense transform, GELU, LayerNorm, decoder tied to the word embeddings plus a bias). Initialisation
N(0, 0.02) as in the original release. ``forward`` takes the same optional layer map as the GPT model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .loss import head_and_loss

LN_EPS = 1e-12


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, attn_mask))
        x = self.ln_2(x + self.mlp(x))
        return x


class BERT(nn.Module):
    family = "bert"
    block_prefix = "blocks"

    def __init__(self, cfg: ModelConfig, n_blocks: int | None = None):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embeddings = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_ln = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(n_blocks or cfg.n_layer)])
        self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.head_ln = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def make_block(self) -> Block:
        return Block(self.config)

    def hidden(self, idx: torch.Tensor, layer_map: Sequence[int] | None = None,
               token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C). ``attention_mask`` (B, T): 1 for real tokens, 0 for padding."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the position table ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        x = self.word_embeddings(idx) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        x = self.drop(self.emb_ln(x))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T): keys that may be attended
        for i in range(len(self.blocks)) if layer_map is None else layer_map:
            x = self.blocks[i](x, mask)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                layer_map: Sequence[int] | None = None, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                loss_chunk: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(MLM logits, mean cross-entropy over the masked positions or None); ``loss_chunk`` as in GPT."""
        h = self.hidden(idx, layer_map, token_type_ids, attention_mask)
        h = self.head_ln(F.gelu(self.head_dense(h)))
        return head_and_loss(h, self.word_embeddings.weight, self.head_bias, targets, loss_chunk)  # tied decoder

    def block_matmul_params(self) -> int:
        d = self.config.n_embd
        return 4 * d * d + 2 * self.config.mlp_ratio * d * d

    def head_matmul_params(self) -> int:
        d = self.config.n_embd
        return d * d + d * self.config.vocab_size
