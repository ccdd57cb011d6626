"""``apollo generate``: sample text from a trained causal model, so users can look at what they trained.

Autoregressive sampling as in nanoGPT (the whole context is re-run for each new token, cropped to the
model's trained sequence length): temperature, then top-k, then nucleus (top-p, Holtzman et al. 2020)
filtering. A run still growing is sampled at its target depth through its layer map, the model the
evaluation reports. Sampling stops at the end-of-document token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, layer_map: Sequence[int] | None = None,
             stop_token: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens; temperature 0 is greedy decoding.

    Rows that produced ``stop_token`` keep producing it, so the batch stays rectangular; generation ends
    early once every row has stopped.
    """
    block_size = model.config.block_size
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits, _ = model(context, layer_map=layer_map)
        logits = logits[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        if stop_token is not None:
            nxt = torch.where(done[:, None], torch.full_like(nxt, stop_token), nxt)
            done |= nxt[:, 0] == stop_token
        idx = torch.cat([idx, nxt], dim=1)
        if stop_token is not None and bool(done.all()):
            break
    return idx


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   num_samples: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")


def generate_from_run(run_dir: str | Path, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                      top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
                      seed: int = 1337, device: str = "auto") -> list[str]:
    """``apollo generate``: the prompt followed by each sample's continuation, decoded to text."""
    from ..data.tokenizer import special_ids
    from ..train.wrap import resolve_device
    from .evaluate import load_run

    _check_options(max_new_tokens, temperature, top_k, top_p, num_samples)
    run = load_run(run_dir)
    if run.mcfg.family == "bert":
        raise UserError(f"{run_dir} holds a BERT (masked language) model, which does not generate text left to "
                        "right: use a gpt or llama run")
    dev = resolve_device(device)
    run.model.to(dev)
    eot = special_ids(run.tokenizer, run.mcfg.family).separator
    ids = run.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    start = torch.tensor([[eot] + ids] * num_samples, dtype=torch.long, device=dev)  # a new document begins
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = generate(run.model, start, max_new_tokens, temperature, top_k, top_p, run.target_map, eot, gen)
    texts = []
    for row in out.tolist():
        new = row[start.size(1):]
        if eot in new:
            new = new[:new.index(eot)]
        texts.append(prompt + run.tokenizer.decode(new, skip_special_tokens=True))
    return texts
