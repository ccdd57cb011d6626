"""How much a trained model uses its context: a diagnostic for the late drops in the loss of small MLM runs.

For each run directory (its latest checkpoint, at the target depth) on the run's own fixed validation batches
(the ones its validation loss was measured on), this prints

- ``loss``: the validation loss as training measured it;
- ``uniform``: the loss with every attention head replaced by uniform attention over the sequence (the model
  keeps its weights but can no longer choose where to look: a bag of words);
- ``self``: the loss with every head attending to its own position only (no context at all);
- ``unigram``: the cross-entropy of the training text's token frequencies on the same targets, the loss of a
  model that ignores its input;
- per-head attention statistics at the model's own attention: the mean entropy (nats; uniform over 64
  positions is 4.16) and the share of attention a query gives to its own position and to its two neighbours;
  the table shows the mean entropy over all heads, the sharpest head's entropy and the largest share any head
  gives to the two neighbours together (1/32 where attention is uniform over 64 positions).

A model whose ``loss`` is close to ``uniform`` and ``unigram`` has not learnt to route information between
positions. Nothing here trains or writes into the runs::

    python bench/probe_context.py bench/out/cpu10-bert-seed3-lr5e-4/scratch bench/out/cpu10-bert-seed3-lr1e-3/stack
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apollo_lm.data.batches import IGNORE
from apollo_lm.data.tokens import prepare_corpus
from apollo_lm.eval.evaluate import load_run
from apollo_lm.train.loop import evaluate, validation_batches

_SDPA = F.scaled_dot_product_attention


def _weights(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The softmax attention weights (B, nh, T, T) that scaled_dot_product_attention would use."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1)


@contextlib.contextmanager
def attention(mode: str, record: list | None = None):
    """Replace F.scaled_dot_product_attention: 'uniform' or 'self' attention, or the model's own ('record',
    appending each call's weights to ``record``)."""

    def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if mode == "self":
            return v
        # equal scores give uniform attention over the keys the masks allow
        w = _weights(torch.zeros_like(q) if mode == "uniform" else q, k, attn_mask, is_causal)
        if record is not None:
            record.append(w.detach())
        return w @ v  # eval mode: no dropout

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def head_stats(weights: list[torch.Tensor]) -> list[dict]:
    """Per layer and head: mean entropy, share on self, on the previous and on the next position."""
    layers = []
    for w in weights:  # (B, nh, T, T), one per layer call
        T = w.shape[-1]
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))  # (nh,)
        diag = torch.diagonal(w, 0, -2, -1).mean(dim=(0, 2))
        prev = torch.diagonal(w, -1, -2, -1).sum(-1).div(T).mean(0)  # query t gives to t-1 (0 for t = 0)
        nxt = torch.diagonal(w, 1, -2, -1).sum(-1).div(T).mean(0)
        layers.append({"entropy": ent.tolist(), "self": diag.tolist(), "prev": prev.tolist(), "next": nxt.tolist()})
    return layers


def probe(run_dir: str) -> dict:
    run = load_run(run_dir)
    corpus = prepare_corpus(run.cfg, tokenizer=run.tokenizer)
    vocab = run.mcfg.vocab_size
    batches = validation_batches(corpus, run.cfg, vocab)
    dev = torch.device("cpu")
    out = {"run": run_dir, "step": run.step, "loss": evaluate(run.model, batches, dev, None, run.target_map)}
    for mode in ("uniform", "self"):
        with attention(mode):
            out[mode] = evaluate(run.model, batches, dev, None, run.target_map)
    # the unigram model of the training text, add-one smoothed
    counts = np.bincount(np.asarray(corpus.train.tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    ys = np.concatenate([b.y.numpy().ravel() for b in batches])
    ys = ys[ys != IGNORE]
    out["unigram"] = float(-logp[ys].mean())
    record: list[torch.Tensor] = []
    some = batches[:4]
    with attention("record", record), torch.no_grad():
        run.model.eval()
        for b in some:
            run.model(b.x, b.y, layer_map=run.target_map)
    n_layers = len(record) // len(some)
    merged = [torch.cat(record[i::n_layers]) for i in range(n_layers)]
    layers = head_stats(merged)
    ents = [e for layer in layers for e in layer["entropy"]]
    nbr = [p + n for layer in layers for p, n in zip(layer["prev"], layer["next"])]
    out.update({"mean_entropy": float(np.mean(ents)), "min_entropy": float(min(ents)), "heads": len(ents),
                "max_neighbour_share": float(max(nbr)),
                "self_share": float(np.mean([s for layer in layers for s in layer["self"]])), "layers": layers})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with a checkpoint)")
    ap.add_argument("--json", help="also write the full results, per-head statistics included, to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [probe(r) for r in args.runs]
    print("| run | step | loss | uniform attention | self only | unigram | entropy: mean, sharpest head "
          "| largest share on the neighbours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['step']} | {r['loss']:.4f} | {r['uniform']:.4f} | {r['self']:.4f} | "
              f"{r['unigram']:.4f} | {r['mean_entropy']:.2f}, {r['min_entropy']:.2f} | "
              f"{r['max_neighbour_share']:.3f} |")
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
