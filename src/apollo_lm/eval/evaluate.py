"""``apollo eval``: a trained model's loss, perplexity and bits per byte on any text.

Causal models are scored on consecutive windows of the token stream (every token predicted once, with the
preceding tokens of its window as context). Masked models are scored on the masked positions of the same
windows, masked with a fixed seed. Bits per byte = total loss in bits / UTF-8 bytes of the text scored, so
runs with different tokenizers compare.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer

from ..config import ModelConfig, RunConfig
from ..data.batches import Batcher
from ..data.readers import expand_sources, iter_documents
from ..data.tokenizer import encode_documents, load_tokenizer, special_ids
from ..errors import UserError
from ..growth.expand import expand_state, split_repeated_outputs
from ..growth.maps import layer_map
from ..models import FAMILIES, build_model
from ..train.checkpoint import latest_checkpoint, load_model_state, read_checkpoint
from ..train.loop import evaluate
from ..train.wrap import autocast_dtype, resolve_device


@dataclass
class LoadedRun:
    cfg: RunConfig
    mcfg: ModelConfig
    tokenizer: Tokenizer
    model: nn.Module
    n_blocks: int
    step: int
    target_map: list[int] | None  # how the physical blocks run as the target depth (None: plainly)
    checkpoint: Path
    # --repeat-scale uses, mid-growth: the map already written into ``model`` (a plain target-depth model whose
    # copies' output projections are divided by their number of copies); n_blocks stays the physical count
    grown_from: list[int] | None = None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The latest checkpoint of a run as a model at its target depth."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a run directory (no config.json): give the --out of a training run")
    ck_path = latest_checkpoint(run)
    if ck_path is None:
        raise UserError(f"{run} has no checkpoint yet: train it first (apollo train --resume {run})")
    ck = read_checkpoint(ck_path)
    cfg = RunConfig.from_dict(ck["config"], source=str(ck_path / "config.json"))
    mcfg = ModelConfig.from_dict(ck["model_config"])
    n_blocks = int(ck["model_config"].get("n_blocks", mcfg.n_layer))
    tmap = None if n_blocks == mcfg.n_layer else layer_map(ck["state"].get("layer_map", "interpolate"), n_blocks,
                                                           mcfg.n_layer)
    weights, grown_from = ck["weights"], None
    if tmap is not None and cfg.repeat_scale == "uses":
        # the delivered model runs repeated blocks at 1/uses strength: load it as the plain target-depth model it
        # equals (the copies' output projections divided by their number), so eval, generate, glue and export see
        # an ordinary model
        weights = split_repeated_outputs(expand_state(weights, n_blocks, mcfg.n_layer, "interpolate"), tmap,
                                         FAMILIES[mcfg.family].residual_out)
        grown_from, tmap = tmap, None
    model = build_model(mcfg, mcfg.n_layer if grown_from is not None else n_blocks)
    load_model_state(model, weights, what=f"checkpoint {ck_path}")
    model.to(torch.device(device) if isinstance(device, str) else device).eval()
    tok = load_tokenizer(str(run / "tokenizer.json"))
    if tok.get_vocab_size() != mcfg.vocab_size:
        raise UserError(f"{run}/tokenizer.json has {tok.get_vocab_size()} tokens but the model has "
                        f"{mcfg.vocab_size}: it is not this run's tokenizer; restore the original")
    return LoadedRun(cfg, mcfg, tok, model, n_blocks, int(ck["state"]["step"]), tmap, ck_path, grown_from)


def evaluate_text(run: LoadedRun, sources: list[str], max_tokens: int = 2_000_000, batch_size: int = 16,
                  device: str = "auto") -> dict:
    dev = resolve_device(device)
    run.model.to(dev)
    files = expand_sources(sources)
    ids = special_ids(run.tokenizer, run.mcfg.family)
    stream: list[np.ndarray] = []
    n_tokens, n_bytes = 0, 0
    docs = list(iter_documents(files, run.cfg.text_field, run.cfg.txt_docs))
    for text, toks in zip(docs, encode_documents(run.tokenizer, docs)):
        if n_tokens >= max_tokens:
            break
        if not toks:
            continue
        stream.append(np.asarray(toks + [ids.separator], dtype=np.int64))
        n_tokens += len(toks) + 1
        n_bytes += len(text.encode("utf-8"))
    if not stream:
        raise UserError(f"no text found in {' '.join(sources)}: the files are empty or hold no "
                        f"{run.cfg.text_field!r} text")
    tokens = np.concatenate(stream)
    T = run.cfg.seq_len
    length = T + 1 if run.mcfg.family != "bert" else T - 1
    if len(tokens) < length:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one sequence ({T}): give more text")
    batcher = Batcher(tokens, run.mcfg.family, T, batch_size, ids, run.mcfg.vocab_size, seed=0)
    stride = T if run.mcfg.family != "bert" else T - 1
    starts = np.arange(0, len(tokens) - length + 1, stride, dtype=np.int64)
    rng = np.random.default_rng(0)
    batches = [batcher._make(rng, starts[i:i + batch_size]) for i in range(0, len(starts), batch_size)]
    loss = evaluate(run.model, batches, dev, autocast_dtype(run.cfg.dtype, dev), run.target_map)
    scored = len(starts) * T if run.mcfg.family != "bert" else None
    # bits per byte: the loss per token times tokens per byte of the text scored
    tokens_per_byte = n_tokens / max(1, n_bytes)
    out = {
        "run": str(run.checkpoint.parent.parent), "checkpoint_step": run.step, "data": sources,
        "objective": "masked_lm" if run.mcfg.family == "bert" else "causal_lm",
        "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) * tokens_per_byte,
        "tokens": int(len(tokens)), "bytes": int(n_bytes), "windows": int(len(starts)),
        "depth": run.mcfg.n_layer, "physical_blocks": run.n_blocks,
    }
    if scored is not None:
        out["tokens_scored"] = int(scored)
    return out


def format_eval(result: dict) -> str:
    lines = [f"run {result['run']} (step {result['checkpoint_step']}, depth {result['depth']}"
             + (f" through {result['physical_blocks']} physical blocks" if result["physical_blocks"] != result["depth"]
                else "") + ")",
             f"  loss          {result['loss']:.4f} nats/token ({result['objective']})",
             f"  perplexity    {result['perplexity']:.2f}",
             f"  bits per byte {result['bits_per_byte']:.4f}",
             f"  text          {result['tokens']} tokens, {result['bytes']} bytes, {result['windows']} windows"]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result)
