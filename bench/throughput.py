"""Cost per depth: does a step at depth D cost what a plain D-layer model's step costs?

For each depth D in --depths, times a full training step (forward, backward, AdamW) of
  (a) a plain model with D blocks, and
  (b) a weight-shared model with n < D physical blocks run at depth D through the interpolation map
      (what Apollo does in its sampling stages),
interleaving the two so that drifts of the machine hit both alike, and reports tokens/s, the median ratio
(b)/(a), and, on a GPU, MFU. It also times one depth draw of the LVPS sampler.

    python bench/throughput.py                       # CPU size: 12 layers, 128 hidden, seq 64, batch 32
    python bench/throughput.py --size gpt2-base      # GPU: 768 hidden, seq 1024, bf16, compiled blocks
    python bench/throughput.py --size gpt2-base --depths 12 --loss-chunk 4096   # the chunked output layer + loss
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from apollo_lm.config import ModelConfig  # noqa: E402
from apollo_lm.growth.maps import interpolate_map  # noqa: E402
from apollo_lm.growth.samplers import DepthSampler  # noqa: E402
from apollo_lm.models import build_model  # noqa: E402
from apollo_lm.train.flops import peak_flops, train_step_flops  # noqa: E402
from apollo_lm.train.optim import build_optimizer  # noqa: E402
from apollo_lm.train.wrap import prepare_model  # noqa: E402

SIZES = {
    "cpu": dict(n_embd=128, n_head=4, vocab=2048, seq=64, batch=32, device="cpu", amp=None, compile=False),
    "gpt-small": dict(n_embd=512, n_head=8, vocab=8192, seq=512, batch=64, device="cuda", amp=torch.bfloat16,
                      compile=True),
    "gpt2-base": dict(n_embd=768, n_head=12, vocab=50304, seq=1024, batch=16, device="cuda", amp=torch.bfloat16,
                      compile=True),
}


class Stepper:
    def __init__(self, cfg: ModelConfig, n_blocks: int, depth: int, size: dict, loss_chunk: int = 0):
        torch.manual_seed(0)
        self.dev = torch.device(size["device"])
        self.model = prepare_model(build_model(cfg, n_blocks), self.dev, size["compile"])
        self.opt = build_optimizer(self.model, 1e-4, 0.1, (0.9, 0.95), self.dev)
        self.lmap = None if n_blocks == depth else interpolate_map(n_blocks, depth)
        self.amp = size["amp"]
        self.loss_chunk = loss_chunk
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, cfg.vocab_size, (size["batch"], size["seq"]), generator=g).to(self.dev)
        self.y = torch.randint(0, cfg.vocab_size, (size["batch"], size["seq"]), generator=g).to(self.dev)

    def step(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(self.dev.type, dtype=self.amp, enabled=self.amp is not None):
            _, loss = self.model(self.x, self.y, layer_map=self.lmap, loss_chunk=self.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.detach())
        return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="cpu")
    p.add_argument("--depths", default="1,3,6,12")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", choices=("size", "on", "off"), default="size",
                   help="per-block torch.compile: as the size says (GPU sizes on, cpu off), or forced")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="compute the output layer and loss this many positions at a time (apollo train --loss-chunk)")
    p.add_argument("--plain-only", action="store_true", help="time the plain models only (no weight-shared one)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    size = SIZES[a.size]
    if a.compile != "size":
        size = size | {"compile": a.compile == "on"}
    if a.batch:
        size = size | {"batch": a.batch}
    if size["device"] == "cuda" and not torch.cuda.is_available():
        print(f"error: --size {a.size} needs a CUDA GPU; use --size cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    depths = [int(d) for d in a.depths.split(",")]
    cfg = ModelConfig("gpt", max(depths), size["n_embd"], size["n_head"], size["vocab"], size["seq"])
    tokens = size["batch"] * size["seq"]
    peak = peak_flops(torch.cuda.get_device_name(0)) if size["device"] == "cuda" else None
    rows = []
    for D in depths:
        plain = Stepper(cfg, D, D, size, a.loss_chunk)
        shared = Stepper(cfg, max(1, D // 3), D, size, a.loss_chunk) if D > 1 and not a.plain_only else None
        for _ in range(3):
            plain.step()
            if shared:
                shared.step()
        tp, ts = [], []
        for _ in range(a.steps):
            tp.append(plain.step())
            if shared:
                ts.append(shared.step())
        mp = statistics.median(tp)
        flops = train_step_flops(plain.model, D, size["seq"], tokens)
        row = {"depth": D, "plain_tokens_per_s": tokens / mp, "plain_step_s": mp}
        if peak:
            row["mfu"] = flops / mp / peak
        if shared:
            ms = statistics.median(ts)
            row.update({"shared_blocks": len(shared.model.blocks), "shared_tokens_per_s": tokens / ms,
                        "shared_over_plain": ms / mp})
        rows.append(row)
        print(json.dumps(row), flush=True)
    s = DepthSampler("lvps", 12)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(10_000):
        s.sample(3, rng)
    draw_us = (time.perf_counter() - t0) / 10_000 * 1e6
    print(json.dumps({"lvps_draw_us": draw_us}))
    result = {"size": a.size, "threads": a.threads, "batch": size["batch"], "loss_chunk": a.loss_chunk,
              "rows": rows, "lvps_draw_us": draw_us,
              "device": torch.cuda.get_device_name(0) if size["device"] == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d")}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
