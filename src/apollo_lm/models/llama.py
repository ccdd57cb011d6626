"""Llama-style causal language model (Touvron et al. 2023), in the manner of nanoGPT.

Pre-norm blocks with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021) in the
"rotate half" layout that Hugging Face's ``LlamaForCausalLM`` uses (so export needs no weight permutation),
SwiGLU MLP (Shazeer 2020), no biases, optional grouped-query attention (Ainslie et al. 2023: ``n_kv_head``
key/value heads shared by groups of query heads), tied or untied output head. Initialisation as the GPT
model: N(0, 0.02), residual projections scaled by 1/sqrt(2 L).

``forward`` takes the same optional layer map as the other families: logical layer ``t`` runs physical block
``layer_map[t]``. Rotary tables are recomputed per forward (they are tiny) rather than kept as buffers, so
the model's state dict holds parameters only and growth can copy blocks by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .loss import head_and_loss

DEFAULT_NORM_EPS = 1e-5


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: 2/3 of ``mlp_ratio * n_embd`` rounded up to a multiple of 32, so the three SwiGLU
    matrices hold about as many weights as GPT's two (Shazeer 2020, Sec. 2; Llama uses the same 2/3 rule)."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return 32 * math.ceil(2 * cfg.mlp_ratio * cfg.n_embd / 3 / 32)


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_head or cfg.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as Hugging Face's LlamaRMSNorm does (exact export parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(T: int, head_size: int, theta: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (T, hs), frequencies theta^(-2i/hs) repeated for both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float) / head_size))
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of ``x`` (B, nh, T, hs) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = kv_heads(cfg)
        self.head_size = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_size, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_size, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_size, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_size, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_size
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        eps = cfg.norm_eps or DEFAULT_NORM_EPS
        self.attn_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is not None:  # a block run as several logical layers (--repeat-scale uses): a 0-d tensor,
            # so that compiled blocks (--compile) do not recompile for each value
            x = x + scale * self.attn(self.attn_norm(x), cos, sin)
            return x + scale * self.mlp(self.mlp_norm(x))
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Llama(nn.Module):
    family = "llama"
    block_prefix = "blocks"  # growth finds physical block i under "blocks.{i}."
    residual_out = ("attn.o_proj.", "mlp.down_proj.")  # block parameters that write into the residual stream

    def __init__(self, cfg: ModelConfig, n_blocks: int | None = None):
        super().__init__()
        if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f"n_embd {cfg.n_embd} must split into {cfg.n_head} heads of even size (rotary pairs)")
        if cfg.n_head % kv_heads(cfg):
            raise ValueError(f"n_head {cfg.n_head} must be a multiple of n_kv_head {cfg.n_kv_head}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(n_blocks or cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps or DEFAULT_NORM_EPS)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual projections, as GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_block(self) -> Block:
        return Block(self.config)

    def hidden(self, idx: torch.Tensor, layer_map: Sequence[int] | None = None,
               branch_scale: Sequence[float] | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.drop(self.wte(idx))  # (B, T, C)
        cos, sin = rotary_tables(T, self.config.n_embd // self.config.n_head, self.config.rope_theta, idx.device,
                                 x.dtype)
        order = range(len(self.blocks)) if layer_map is None else layer_map
        for t, i in enumerate(order):
            s = None if branch_scale is None or branch_scale[t] == 1.0 else x.new_full((), branch_scale[t])
            x = self.blocks[i](x, cos, sin) if s is None else self.blocks[i](x, cos, sin, s)
        return self.norm(x)

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
        d, hs = self.config.n_embd, self.config.n_embd // self.config.n_head
        attn = 2 * d * d + 2 * d * kv_heads(self.config) * hs  # q and o full width; k and v at n_kv_head heads
        return attn + 3 * d * mlp_hidden_size(self.config)

    def head_matmul_params(self) -> int:
        return self.config.n_embd * self.config.vocab_size
