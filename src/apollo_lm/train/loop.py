"""The training loop: scratch training and every depth-growth method share it.

Each optimizer step asks the stage schedule how many physical blocks are in force (growing the model and
its optimizer state at a stage boundary), draws one depth D from the sampler, runs the model through the
layer map for D, and counts the FLOPs of the depth actually run. Evaluation runs at the target depth L
through the layer map (the model as it would be delivered now) and, while n < L, at the physical depth n.
Wall-clock time excludes evaluation and checkpointing; ``wall_total`` includes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import (OPERATOR_METHODS, STACK_FAMILY_CHECKED_TPP, STACK_GROW_AT, STACK_GROW_AT_LONG,
                      STACK_LONG_BUDGET_TPP, ModelConfig, RunConfig, format_grow_at, parse_amount, parse_grow_at,
                      parse_stage_lr, parse_stages, stack_grow_at_for_budget)
from ..data.batches import Batch, Batcher
from ..data.tokenizer import load_tokenizer, save_tokenizer
from ..data.tokens import Corpus, prepare_corpus
from ..errors import UserError
from ..growth.expand import expand_state, repeat_scales, source_blocks, split_repeated_outputs
from ..growth.maps import layer_map
from ..growth.samplers import DepthSampler, rng_from_state, rng_state
from ..growth.schedule import StageSchedule
from ..growth.staged_schedule import GrowthEvent, initial_config, parse_staged_stages, should_grow
from ..models import build_model
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed
from .checkpoint import (FORMAT_DCP, latest_checkpoint, load_dcp_into, load_model_state, model_state,
                         read_checkpoint, save_checkpoint, save_dcp_checkpoint, write_json)
from .flops import peak_flops, train_step_flops
from .metrics import ExternalLoggers, MetricsWriter, require_logger_packages, truncate_metrics
from .optim import (build_optimizer, flatten_optimizer_state, load_named_optimizer_state, lr_at,
                    named_optimizer_state, unflatten_optimizer_state)
from .wrap import autocast_dtype, prepare_model, reshard, resolve_device, shard_model

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    wall: float = 0.0  # training seconds, evaluation and checkpointing excluded
    wall_total: float = 0.0
    n_blocks: int = 0
    stage: int = 0
    sampler_rng: dict = field(default_factory=dict)
    last_val_loss: float | None = None
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    auto_fired: list = field(default_factory=list)  # positions where @auto growth events fired
    small_flops: float | None = None  # bert2bert / ligo: FLOPs spent before growing from the small model


def model_config_for(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    """The target architecture: the options, with the tokenizer's vocabulary, and with the architecture details
    of an --init-from checkpoint that the options do not express (Llama's MLP size, rotary base, norm epsilon)."""
    m = cfg.model_config()
    m.vocab_size = vocab_size
    if cfg.init_from:
        import json

        from ..interop.hf import model_config_from_hf
        hf = model_config_from_hf(json.loads((Path(cfg.init_from) / "config.json").read_text()))
        for name in ("intermediate_size", "rope_theta", "norm_eps", "mlp_ratio", "type_vocab_size"):
            setattr(m, name, getattr(hf, name))
    return m


def validation_batches(corpus: Corpus, cfg: RunConfig, vocab: int) -> list[Batch]:
    """The run's fixed validation batches: the ones its validation loss is measured on."""
    return Batcher(corpus.valid.tokens, cfg.model, cfg.seq_len, cfg.batch_size, corpus.ids, vocab,
                   cfg.seed).fixed_batches(cfg.eval_batches)


def evaluate(model: nn.Module, batches: list[Batch], device: torch.device, amp: torch.dtype | None,
             lmap: list[int] | None = None, branch_scale: list[float] | None = None) -> float:
    """Token-weighted mean loss over fixed batches."""
    total, count = evaluate_sums(model, batches, device, amp, lmap, branch_scale)
    return total / max(1, count)


def _scale_kw(branch_scale: list[float] | None) -> dict[str, Any]:
    """The model keyword for --repeat-scale uses, passed only when set (BERT's forward has no such argument)."""
    return {} if branch_scale is None else {"branch_scale": branch_scale}


@torch.no_grad()
def evaluate_sums(model: nn.Module, batches: list[Batch], device: torch.device, amp: torch.dtype | None,
                  lmap: list[int] | None = None, branch_scale: list[float] | None = None) -> tuple[float, int]:
    """(sum of token losses, scored tokens) over the batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = b.to(device)
        with _autocast(device, amp):
            _, loss = model(b.x, b.y, layer_map=lmap, **_scale_kw(branch_scale))
        n = int((b.y != -100).sum())
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total, count


def _autocast(device: torch.device, amp: torch.dtype | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


class Trainer:
    """Set up from a resolved config (or a run directory to resume) and train to the end of the budget."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, stop_after: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.stop_after = stop_after
        self._stop_signal: str | None = None
        self.dist = DistInfo()
        self.ddp: nn.Module | None = None  # the DDP wrapper when several processes train together
        self.sharded = False  # --parallel fsdp with several processes: the model itself is sharded (FSDP2)
        self.param_dtype: torch.dtype | None = None  # FSDP2 mixed precision (instead of autocast)
        self._grown_size_cache: dict[int, tuple[int, float]] = {}  # @auto: size of the model each event makes

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:
            logging.getLogger("apollo_lm").setLevel(logging.WARNING)
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.sharded = self.dist.enabled and cfg.parallel == "fsdp"
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh(self.device.type, (self.dist.world,))
            # bf16 compute on fp32 sharded master weights, gradients reduced in fp32: FSDP2's mixed precision
            self.param_dtype, self.amp = self.amp, None
        if cfg.log_to and self.dist.is_main:
            require_logger_packages(cfg.log_to)
        tok = load_tokenizer(str(self.run_dir / "tokenizer.json")) if self.resume else None
        if not self.dist.is_main:
            barrier(self.dist)  # rank 0 trains the tokenizer and fills the token cache first
        self.corpus: Corpus = prepare_corpus(cfg, tokenizer=tok)
        if self.dist.is_main:
            barrier(self.dist)
        vocab = self.corpus.tokenizer.get_vocab_size()
        if self.resume and (self.run_dir / "model.json").is_file():  # the run's own record is authoritative
            self.mcfg = ModelConfig.from_dict(json.loads((self.run_dir / "model.json").read_text()))
            if self.mcfg.vocab_size != vocab:
                raise UserError(f"{self.run_dir}/tokenizer.json has {vocab} tokens but the run's model has "
                                f"{self.mcfg.vocab_size}: it is not this run's tokenizer; restore the original")
        else:
            self.mcfg = model_config_for(cfg, vocab)
        self.batcher = Batcher(self.corpus.train.tokens, cfg.model, cfg.seq_len, cfg.batch_size, self.corpus.ids,
                               vocab, cfg.seed)
        self.valid_batches = validation_batches(self.corpus, cfg, vocab)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world
        self._setup_budget_and_schedule()
        self.samplers = self._stage_samplers()
        first = self.stage_cfg.n_layer if cfg.method in OPERATOR_METHODS else self.schedule.stages[0]
        self.state = TrainState(n_blocks=first)
        self.sampler_rng = np.random.default_rng([cfg.seed, 0xDE9])
        self._history: list[tuple[float, float]] = []  # (FLOPs, train loss) in the current stage, for @auto
        if self.resume:
            self._load_latest()
        elif cfg.init_from:
            from ..growth.expand import count_blocks
            from ..interop.hf import init_weights_from_hf

            torch.manual_seed(cfg.seed)
            weights = init_weights_from_hf(cfg.init_from, self.stage_cfg)
            k = count_blocks(weights)
            if k != first:
                raise UserError(f"{cfg.init_from} has {k} layers but this run's first stage has {first}: "
                                + (f"start the stages at {k} (e.g. --stages {k},{self.mcfg.n_layer})"
                                   if cfg.method != "scratch" else f"use --n-layer {k}, or a growth method "
                                   f"whose first stage has {k} blocks"))
            self._build(first, weights=weights, opt_state=None)
            log.info("initialised from %s (%d layers)", cfg.init_from, k)
        else:
            torch.manual_seed(cfg.seed)
            self._build(first, weights=None, opt_state=None)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)

    def _setup_budget_and_schedule(self) -> None:
        cfg = self.cfg
        if cfg.flops is not None:
            self.budget_unit, self.budget_total = "flops", parse_amount(cfg.flops, "--flops")
        elif cfg.tokens is not None:
            toks = parse_amount(cfg.tokens, "--tokens")
            self.budget_unit, self.budget_total = "steps", max(1, math.ceil(toks / self.tokens_per_step))
        else:
            self.budget_unit, self.budget_total = "steps", cfg.steps
        self.stage_cfg = self.mcfg  # the architecture of the physical model now (differs under width growth)
        self.op_events: list[GrowthEvent] = []
        self.op_starts: list[float | None] = []
        self.stage_lr: list[float] = []
        if cfg.method == "scratch":
            self.schedule = StageSchedule.single(self.mcfg.n_layer)
            return
        if cfg.method in OPERATOR_METHODS:
            self._setup_operator_schedule()
            self._setup_stage_lr(len(self.op_events) + 1, "growth events plus one")
            return
        stages = parse_stages(cfg.stages)
        if stages[-1] != self.mcfg.n_layer:
            raise UserError(f"the last stage ({stages[-1]} blocks) must equal the target depth {self.mcfg.n_layer}: "
                            f"end --stages with {self.mcfg.n_layer}")
        if cfg.grow_at is None:  # three stacking stages without --grow-at: the points follow the budget
            cfg.grow_at = self._budget_grow_at()
        starts = [self._to_position(value, unit) for value, unit in parse_grow_at(cfg.grow_at)]
        self._check_starts(starts, f"--grow-at {cfg.grow_at}")
        self.schedule = StageSchedule(tuple(stages), tuple(starts), self.budget_unit)
        self._setup_stage_lr(len(stages), f"stages ({','.join(map(str, stages))})")

    def plan(self) -> dict[str, Any]:
        """What the run will do, known before its first step: the target model's parameters and the budget's
        tokens per parameter; for growth without depth sampling on a step or token budget also each stage's
        steps and the run's FLOPs as a fraction of training the target model at full depth for as many steps."""
        target, n_params = self._target()
        out: dict[str, Any] = {"params": n_params}
        if self.budget_unit == "steps":
            tokens = self._budget_tokens(target)
            out.update(tokens=tokens, tokens_per_param=tokens / n_params)
        if (self.budget_unit != "steps" or self.cfg.method in OPERATOR_METHODS or self.cfg.method == "scratch"
                or self.cfg.sampler != "none"):
            return out
        sched, total = self.schedule, int(self.budget_total)
        bounds = [0, *(int(s) for s in sched.starts), total]
        out["stages"] = [{"blocks": n, "first_step": a, "last_step": b - 1}
                         for n, a, b in zip(sched.stages, bounds, bounds[1:])]
        per_step = [train_step_flops(target, n, self.cfg.seq_len, self.tokens_per_step) for n in sched.stages]
        spent = sum(f * (b - a) for f, a, b in zip(per_step, bounds, bounds[1:]))
        out["flops_fraction"] = spent / (per_step[-1] * total)
        return out

    def _target(self) -> tuple[nn.Module, int]:
        """The target model on the meta device (no memory) and its parameter count, tied weights counted once."""
        with torch.device("meta"):
            target = build_model(self.mcfg)
        return target, sum(p.numel() for p in target.parameters())

    def _budget_tokens(self, target: nn.Module) -> float:
        """The tokens the budget trains; for a FLOPs budget those that training the target at full depth would
        take (the fewest it can train)."""
        if self.budget_unit == "steps":
            return self.budget_total * self.tokens_per_step
        return self.budget_total / train_step_flops(target, self.mcfg.n_layer, self.cfg.seq_len, 1)

    def _budget_grow_at(self) -> str:
        """Three-stage stacking's growth points for this budget's tokens per parameter of the target model."""
        target, n_params = self._target()
        tpp = self._budget_tokens(target) / n_params
        family = self.mcfg.family
        points = format_grow_at(stack_grow_at_for_budget(tpp, family))
        log.info("growth points %s for %.2g tokens per parameter: three stacking stages of a %s model grow at %s up to "
                 "%g tokens per parameter and at %s beyond (BENCHMARKS.md); --grow-at sets others", points, tpp, family,
                 format_grow_at(STACK_GROW_AT[3]), STACK_LONG_BUDGET_TPP[family], format_grow_at(STACK_GROW_AT_LONG))
        checked = STACK_FAMILY_CHECKED_TPP.get(family)
        # the other ranks log warnings too: one is enough under torchrun
        if self.dist.is_main and checked is not None and checked[0] < tpp:
            log.warning("growth points %s for %.2g tokens per parameter: on the %s family growth was measured to %s: "
                        "check the run against --method scratch", points, tpp, family, checked[1])
        return points

    def _setup_stage_lr(self, n_stages: int, what: str) -> None:
        if self.cfg.stage_lr is None:
            return
        mults = parse_stage_lr(self.cfg.stage_lr)
        if len(mults) != n_stages:
            raise UserError(f"--stage-lr {self.cfg.stage_lr} gives {len(mults)} multipliers but the run has "
                            f"{n_stages} {what}: give one per stage")
        self.stage_lr = mults

    def _to_position(self, value: float, unit: str) -> float:
        """A growth point in the budget's own unit (optimizer steps, or FLOPs for a FLOPs budget)."""
        if unit == "fraction":
            return round(value * self.budget_total) if self.budget_unit == "steps" else value * self.budget_total
        if self.budget_unit == "flops":
            raise UserError("with a --flops budget give growth points as fractions of the budget (e.g. 0.05,0.1)")
        return round(value) if unit == "steps" else round(value / self.tokens_per_step)

    def _check_starts(self, starts: list[float], what: str) -> None:
        if any(s <= 0 or s >= self.budget_total for s in starts) or any(b <= a for a, b in zip(starts, starts[1:])):
            raise UserError(f"{what} gives growth points {starts} that do not increase strictly inside the budget "
                            f"(0, {self.budget_total:g} {self.budget_unit}): choose later or fewer points, or a "
                            "larger budget")

    def _setup_operator_schedule(self) -> None:
        """staged: the --stages events; bert2bert / ligo: one growth from half the width and depth."""
        cfg, target = self.cfg, self.mcfg
        if cfg.method == "staged":
            events = parse_staged_stages(cfg.stages)
        else:
            if target.n_embd % 2 or target.n_head % 2 or target.n_layer < 2:
                raise UserError(f"--method {cfg.method} starts from half the width and depth: it needs an even "
                                f"--n-embd and --n-head and at least 2 layers (got {target.n_embd}, "
                                f"{target.n_head}, {target.n_layer})")
            (value, unit), = parse_grow_at(cfg.grow_at)
            events = [GrowthEvent("width", target.n_embd // 2, target.n_embd, value, unit),
                      GrowthEvent("depth", target.n_layer // 2, target.n_layer, value, unit)]
        target_dict = target.to_dict()
        if target.family == "llama" and not target_dict.get("intermediate_size"):
            from ..models.llama import mlp_hidden_size
            target_dict["intermediate_size"] = mlp_hidden_size(target)  # pinned: the small model gets its share of it
        self.stage_cfg = ModelConfig.from_dict(initial_config(events, target_dict))
        if cfg.method == "staged":
            self.op_events = events
        else:  # one combined growth event
            self.op_events = [GrowthEvent(cfg.method, 1, 2, events[0].at, events[0].unit)]
        self.op_starts = [None if e.at is None else self._to_position(e.at, e.unit) for e in self.op_events]
        self._check_starts([s for s in self.op_starts if s is not None], f"--stages {cfg.stages or cfg.grow_at}")
        self.schedule = StageSchedule.single(self.mcfg.n_layer)

    def _operator_starts(self) -> list[float | None]:
        """Where each growth event starts: timed ones from the schedule, @auto ones once fired (else None)."""
        fired = iter(self.state.auto_fired)
        return [s if s is not None else next(fired, None) for s in self.op_starts]

    def _operator_stage(self, position: float) -> int:
        """How many growth events have happened before a step at ``position``."""
        stage = 0
        for at in self._operator_starts():
            if at is None or position < at:
                break
            stage += 1
        return stage

    def _apply_event(self, index: int) -> None:
        from ..growth.operators import bert2bert, staged

        cfg, st = self.cfg, self.state
        ev = self.op_events[index]
        w, s, c = model_state(self.model), named_optimizer_state(self.optimizer, self.model), self.stage_cfg.to_dict()
        gen = torch.Generator().manual_seed(cfg.seed + index)
        if ev.operator == "width":
            r = staged.widen(w, s, c, ev.factor, noise=cfg.width_noise, generator=gen)
        elif ev.operator == "depth":
            r = staged.deepen(w, s, c, ev.factor)
        elif ev.operator == "bert2bert":
            st.small_flops = st.flops
            r = bert2bert.grow(w, c, self.mcfg.n_embd, self.mcfg.n_layer, method=cfg.b2b_method, generator=gen)
        else:  # ligo
            st.small_flops = st.flops
            r = self._grow_ligo(w, c, gen)
        if not r.info.get("loss_preserving", True) and ev.operator in ("width", "depth"):
            log.warning("step %d: %s growth is not loss-preserving for the %s family", st.step, ev.operator,
                        self.mcfg.family)
        log.info("step %d: %s growth to %d layers x %d hidden", st.step, ev.operator, r.config["n_layer"],
                 r.config["n_embd"])
        self.stage_cfg = ModelConfig.from_dict(r.config)
        self._build(self.stage_cfg.n_layer, r.weights, r.optimizer_state or None)
        self._history = []

    def _grow_ligo(self, w: dict, c: dict, gen: torch.Generator):
        """Train LiGO's operator on the training objective through the target model, then apply it."""
        from torch.func import functional_call

        from ..growth.operators import ligo

        cfg, st = self.cfg, self.state
        with torch.random.fork_rng(devices=[]):
            target = build_model(self.mcfg).to(self.device)
        calls = {"k": 0}
        amp = autocast_dtype(cfg.dtype, self.device)  # the operator trains an unsharded model (under FSDP too)

        def loss_fn(weights):
            # a fresh batch per operator step, from a stream the training batches never use
            batch = self.batcher.get(st.step, 1_000_000 + calls["k"]).to(self.device)
            calls["k"] += 1
            with _autocast(self.device, amp):
                return functional_call(target, weights, (batch.x, batch.y))[1]

        r = ligo.grow(w, c, self.mcfg.n_embd, self.mcfg.n_layer, loss_fn, steps=cfg.ligo_steps, lr=1e-3,
                      noise_std=1e-3, generator=gen)
        per_step = train_step_flops(target, self.mcfg.n_layer, cfg.seq_len, cfg.batch_size * cfg.seq_len)
        st.flops += cfg.ligo_steps * per_step  # the operator's training is part of the all-in cost
        log.info("LiGO operator: loss %.4f -> %.4f over %d steps", r.info["losses"][0], r.info["final_loss"],
                 cfg.ligo_steps)
        return r

    def _stage_start(self) -> float | None:
        """Where the current stage began (None in the first stage)."""
        st = self.state
        if st.stage == 0:
            return None
        if self.cfg.method in OPERATOR_METHODS:
            return self._operator_starts()[st.stage - 1]
        return self.schedule.starts[st.stage - 1]

    def _build(self, n_blocks: int, weights: dict[str, torch.Tensor] | None,
               opt_state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """(Re)build model, wrapping and optimizer with ``n_blocks`` physical blocks."""
        cfg = self.cfg
        if weights is None:
            model = build_model(self.stage_cfg, n_blocks)
        else:
            with torch.random.fork_rng(devices=[]):  # a rebuild must not move the run's RNG stream
                model = build_model(self.stage_cfg, n_blocks)
            load_model_state(model, weights)
        self.model = prepare_model(model, self.device, cfg.compile)
        self.model.train()
        if self.sharded:  # FSDP2: resharded after every growth step, like the DDP wrapper is rebuilt
            shard_model(self.model, self.mesh, self.param_dtype)
        elif self.dist.enabled:  # rebuilt with the model after every growth step
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device)
        if opt_state:
            load_named_optimizer_state(self.optimizer, self.model, opt_state)
        self.state.n_blocks = n_blocks

    def _grow(self, stage: int) -> None:
        n_old, n_new = self.state.n_blocks, self.schedule.stages[stage]
        cfg = self.cfg
        weights = expand_state(model_state(self.model), n_old, n_new, cfg.layer_map)
        if cfg.repeat_scale == "uses":  # the copies split their source's branch: the same function at depth n_new
            weights = split_repeated_outputs(weights, source_blocks(cfg.layer_map, n_old, n_new),
                                             self.model.residual_out)
        opt_state = expand_state(named_optimizer_state(self.optimizer, self.model), n_old, n_new, cfg.layer_map,
                                 copy_blocks=cfg.grow_optimizer_state == "copy")
        log.info("step %d: growing %d -> %d blocks (%s, optimizer state %s)", self.state.step, n_old, n_new,
                 cfg.layer_map, cfg.grow_optimizer_state)
        self._build(n_new, weights, opt_state)
        self.state.stage = stage

    # ------------------------------------------------------------------ checkpoints
    def _load_latest(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise UserError(f"{self.run_dir} has no complete checkpoint to resume from: start it again without "
                            "--resume (remove the directory first)")
        # a sharded run loads a DCP checkpoint's shards below, straight into its own shards
        ck = read_checkpoint(path, dcp_tensors=not self.sharded)
        st = ck["state"]
        mc = ModelConfig.from_dict(ck["model_config"])
        target = ModelConfig.from_dict(st["target_model"]) if "target_model" in st else mc
        if target != self.mcfg:
            raise UserError(f"checkpoint {path} was written for a different model ({target}); resume it with the "
                            "config it was started with")
        self.stage_cfg = mc
        if st.get("world_size", 1) != self.dist.world:
            raise UserError(f"checkpoint {path} was written by {st.get('world_size', 1)} processes and this run has "
                            f"{self.dist.world}: resume with the same number of processes (torchrun "
                            f"--nproc_per_node {st.get('world_size', 1)}), since the batches each process draws depend "
                            "on it")
        self.state = TrainState(**{k: v for k, v in st.items() if k in TrainState.__dataclass_fields__})
        opt = unflatten_optimizer_state(ck["optimizer"]) if ck["optimizer"] is not None else None
        if ck["weights"] is None:  # DCP under FSDP: every rank reads its own shards, nothing is gathered
            with torch.random.fork_rng(devices=[]):
                self._build(self.state.n_blocks, None, None)
            load_dcp_into(path, self.model, self.optimizer)
        else:
            self._build(self.state.n_blocks, ck["weights"], opt)
        self.sampler_rng = rng_from_state(self.state.sampler_rng)
        if ck["rng"] is not None:
            torch.set_rng_state(ck["rng"]["torch"])
            if self.device.type == "cuda" and "cuda" in ck["rng"]:
                torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        if self.dist.is_main:  # one writer: another rank replacing the file would hide rank 0's new lines
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        barrier(self.dist)
        if self.cfg.method == "staged" and (self.run_dir / "metrics.jsonl").exists():
            from .metrics import read_metrics  # the @auto rule's loss history of the current stage
            self._history = [(r["flops"], r["train_loss"]) for r in read_metrics(self.run_dir / "metrics.jsonl")
                             if r.get("stage") == self.state.stage and not r.get("skipped")
                             and r.get("step", 0) <= self.state.step]
        log.info("resumed %s at step %d (%d blocks)", self.run_dir, self.state.step, self.state.n_blocks)

    def save(self) -> Path:
        self.state.sampler_rng = rng_state(self.sampler_rng)
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        st = dict(self.state.__dict__)
        st["target_depth"] = self.mcfg.n_layer
        st["layer_map"] = self.cfg.layer_map
        st["world_size"] = self.dist.world
        st["target_model"] = self.mcfg.to_dict()
        path = None
        weights = optim = None
        if self.sharded and self.cfg.checkpoint_format == FORMAT_DCP:  # every rank writes its own shards
            path = save_dcp_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, rng, st,
                                       self.cfg.to_dict(), self.stage_cfg.to_dict() | {"n_blocks": self.state.n_blocks},
                                       self.cfg.keep_checkpoints, self.dist.is_main)
        elif self.dist.is_main or self.sharded:  # --checkpoint-format full: every rank takes part in gathering
            weights = model_state(self.model, cpu=self.sharded)
            optim = flatten_optimizer_state(named_optimizer_state(self.optimizer, self.model, cpu=self.sharded))
        if weights is not None and self.dist.is_main:  # DDP keeps weights and optimizer state the same on every rank
            path = save_checkpoint(self.run_dir, self.state.step, weights, optim, rng, st, self.cfg.to_dict(),
                                   self.stage_cfg.to_dict() | {"n_blocks": self.state.n_blocks},
                                   self.cfg.keep_checkpoints)
        del weights, optim
        barrier(self.dist)
        return path or latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------ training
    def position(self) -> float:
        return self.state.step if self.budget_unit == "steps" else self.state.flops

    def done(self) -> bool:
        return self.position() >= self.budget_total

    def target_map(self) -> list[int] | None:
        """Depth-growth methods deliver the target depth through the layer map; operator methods deliver the
        model as it is."""
        n, L = self.state.n_blocks, self.mcfg.n_layer
        if n == L or self.cfg.method in OPERATOR_METHODS:
            return None
        return layer_map(self.cfg.layer_map, n, L)

    def _branch_scale(self, lmap: list[int] | None) -> list[float] | None:
        """--repeat-scale uses: each logical layer's share of its block (None: every branch at full strength)."""
        return repeat_scales(lmap) if lmap is not None and self.cfg.repeat_scale == "uses" else None

    def _evaluate(self, lmap: list[int] | None) -> float:
        """Each rank scores its share of the fixed validation batches; the token-weighted mean over all."""
        mine = self.valid_batches[self.dist.rank::self.dist.world]
        scale = self._branch_scale(lmap)
        total, count = evaluate_sums(self.model, mine, self.device, self.amp, lmap, scale)
        if self.sharded:
            # FSDP forwards are collective: a rank with fewer batches runs extra, uncounted ones; then the
            # gathered parameters are freed so that the model holds the sharded ones the optimizer updates
            extra = -(-len(self.valid_batches) // self.dist.world) - len(mine)
            evaluate_sums(self.model, self.valid_batches[:extra], self.device, self.amp, lmap, scale)
            reshard(self.model)
        total, count = all_reduce_sum(self.dist, [total, count], self.device)
        return total / max(1.0, count)

    def run_evaluation(self) -> dict[str, float]:
        out = {"val_loss": self._evaluate(self.target_map())}
        if self.target_map() is not None:
            out["val_loss_physical"] = self._evaluate(None)
        return out

    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return previous

    def train(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl") if self.dist.is_main else None
        external = ExternalLoggers(cfg.log_to, self.run_dir, cfg.to_dict()) if cfg.log_to and self.dist.is_main \
            else None
        previous = self._install_signal_handlers()
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            total = int(self.budget_total) if self.budget_unit == "steps" else None
            bar = tqdm(total=total, initial=st.step, unit="step", dynamic_ncols=True, mininterval=0.5)
        t_start = time.perf_counter() - st.wall_total
        last: dict[str, Any] = {}
        try:
            while not self.done():
                record = self._train_step()
                step = st.step
                is_last = self.done()
                signalled = self._stop_signal is not None
                if self.dist.enabled:  # every rank stops together, whichever received the signal
                    signalled = all_reduce_sum(self.dist, [float(signalled)], self.device)[0] > 0
                stopping = is_last or signalled or (self.stop_after is not None and step >= self.stop_after)
                if step % cfg.eval_every == 0 or is_last:
                    ev = self.run_evaluation()
                    record.update(ev)
                    st.last_val_loss = ev["val_loss"]
                st.wall_total = time.perf_counter() - t_start
                record["wall_total"] = round(st.wall_total, 4)
                if metrics is not None and (step % cfg.log_every == 0 or "val_loss" in record or stopping):
                    metrics.write(record)
                    if external is not None:
                        external.write(record)
                if bar is not None:
                    post = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                    if st.last_val_loss is not None:
                        post["val"] = f"{st.last_val_loss:.3f}"
                    if self.schedule.stages[-1] != self.schedule.stages[0]:
                        post["depth"] = f"{record['depth']}/{record['n_blocks']}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if step % cfg.save_every == 0 or stopping:
                    self.save()
                last = record
                if stopping and not is_last:
                    why = self._stop_signal or ("a signal" if signalled else f"--stop-after {self.stop_after}")
                    log.info("stopped at step %d (%s); continue with: apollo train --resume %s", step, why,
                             self.run_dir)
                    break
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            if external is not None:
                external.close()
            for sig, h in previous.items():
                signal.signal(sig, h)
        return last

    def _grown_size(self, index: int) -> tuple[int, float]:
        """(parameters, FLOPs per step) of the model after event ``index``; built once per event, not per step."""
        cache = self._grown_size_cache
        if index not in cache:
            ev = self.op_events[index]
            big = dict(self.stage_cfg.to_dict())
            big["n_embd" if ev.operator == "width" else "n_layer"] = ev.new
            if ev.operator == "width":
                big["n_head"] = self.stage_cfg.n_head * ev.factor
            with torch.random.fork_rng(devices=[]):
                large = build_model(ModelConfig.from_dict(big), big["n_layer"])
            cache[index] = (sum(p.numel() for p in large.parameters()),
                            train_step_flops(large, big["n_layer"], self.cfg.seq_len, self.tokens_per_step))
        return cache[index]

    def _maybe_fire_auto(self) -> None:
        """@auto growth (staged_schedule.should_grow): fire the next event when growing pays by the slope rule."""
        st = self.state
        nxt = st.stage
        if nxt >= len(self.op_events) or self.op_starts[nxt] is not None:
            return
        if len(st.auto_fired) > sum(1 for s in self.op_starts[:nxt] if s is None):
            return  # already fired, takes effect at the next step
        if len(self._history) < self.cfg.auto_window:
            return  # the slope is fitted on a full window of the current stage
        ev = self.op_events[nxt]
        n_large, flops_large = self._grown_size(nxt)
        if should_grow([f for f, _ in self._history], [v for _, v in self._history], n_large, flops_large,
                       window=self.cfg.auto_window, margin=self.cfg.auto_margin):
            st.auto_fired.append(self.position())
            log.info("step %d: the auto rule grows %s next (%d -> %d)", st.step, ev.operator, ev.old, ev.new)

    def _stage_samplers(self) -> tuple[DepthSampler, ...]:
        """The depth sampler of each stage, built once: all up to the target depth, or with ``--sample-to next``
        each up to the next stage's physical depth (the last stage, at full depth, draws only that)."""
        cfg, target = self.cfg, self.mcfg.n_layer
        if cfg.sample_to != "next" or cfg.method in OPERATOR_METHODS:
            return (DepthSampler(cfg.sampler, target, cfg.lvps_low, cfg.lvps_high),)
        stages = self.schedule.stages
        return tuple(DepthSampler(cfg.sampler, stages[i + 1] if i + 1 < len(stages) else target, cfg.lvps_low,
                                  cfg.lvps_high) for i in range(len(stages)))

    def _train_step(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        if cfg.method in OPERATOR_METHODS:
            target_stage = self._operator_stage(self.position())
            while st.stage < target_stage:
                self._apply_event(st.stage)
                st.stage += 1
        else:
            stage = self.schedule.stage_at(self.position())
            if stage != st.stage or self.schedule.stages[stage] != st.n_blocks:
                self._grow(stage)
        n = st.n_blocks
        windowed = cfg.sample_from > 0 or cfg.sample_until < 1
        outside = windowed and not (cfg.sample_from <= self.schedule.fraction_of_stage(
            self.position(), self.budget_total) < cfg.sample_until)
        if n < cfg.sample_min_blocks or outside:
            # a stage too small to sample (--sample-min-blocks) or outside its sampling window: the physical depth
            # only (no draw: the depth stream is not consumed)
            depth = n
        else:
            depth = self.samplers[min(st.stage, len(self.samplers) - 1)].sample(n, self.sampler_rng)
        lmap = None if depth == n and cfg.layer_map == "interpolate" else layer_map(cfg.layer_map, n, depth)
        step_flops = train_step_flops(self.model, depth, cfg.seq_len, self.tokens_per_step)
        own = cfg.own_depth_weight if depth > n else 0.0  # a second pass at the physical depth (--own-depth-weight)
        if own:
            step_flops += train_step_flops(self.model, n, cfg.seq_len, self.tokens_per_step)
        if self.budget_unit == "steps":
            progress = (st.step + 1) / self.budget_total
        else:
            progress = min(1.0, (st.flops + step_flops) / self.budget_total)
        lr = lr_at(progress, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.schedule, cfg.decay)
        if self.stage_lr:
            lr *= self.stage_lr[min(st.stage, len(self.stage_lr) - 1)]
        if cfg.rewarmup > 0 and cfg.method in OPERATOR_METHODS and st.stage > 0:
            begun = self._stage_start()
            if begun is not None:  # ramp up again after a growth, as the staged-training release does
                done = (self.position() - begun + (1 if self.budget_unit == "steps" else step_flops))
                lr *= min(1.0, done / (cfg.rewarmup * self.budget_total))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.dist.enabled:
            check = all_reduce_sum(self.dist, [depth, -depth], self.device)  # cheap guard: one depth stream
            if check != [depth * self.dist.world, -depth * self.dist.world]:
                raise RuntimeError(f"step {st.step + 1}: ranks drew different depths; the depth streams diverged")
        loss_sum = self._forward_backward(st.step, lmap, 1.0, sync_last=not own)
        if self.dist.enabled:
            loss_sum = torch.tensor(all_reduce_sum(self.dist, [float(loss_sum)], self.device)[0] / self.dist.world)
        if lmap is not None and cfg.shared_grad == "mean" and depth > n:
            # linear in the gradients, so averaging the local sums before the own-depth pass's reduction is the
            # same as averaging the reduced ones
            average_shared_grads(self.model, lmap)
        own_loss = None
        if own:  # added after the averaging; at its own depth every layer map is the identity: each block once
            own_loss = float(self._forward_backward(st.step, None, own, sync_last=True)) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        train_loss = float(loss_sum) / cfg.grad_accum  # synchronises the device
        skipped = not (math.isfinite(train_loss) and math.isfinite(float(grad_norm)))
        if skipped:  # a non-finite loss or gradient: no update, the step's data is consumed as usual
            st.bad_steps += 1
            log.warning("step %d: non-finite %s; update skipped (%d in a row)", st.step + 1,
                        "loss" if not math.isfinite(train_loss) else "gradient", st.bad_steps)
            if st.bad_steps >= cfg.max_bad_steps:
                last = latest_checkpoint(self.run_dir)
                raise UserError(f"training diverged: {st.bad_steps} steps in a row up to step {st.step + 1} had a "
                                f"non-finite loss or gradient; the last good checkpoint is {last}; try a lower --lr, "
                                "more --warmup, or --dtype fp32")
        else:
            st.bad_steps = 0
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        st.step += 1
        st.tokens += self.tokens_per_step
        st.flops += step_flops
        st.wall += dt
        record = {
            "step": st.step, "tokens": st.tokens, "flops": st.flops, "train_loss": train_loss, "lr": lr,
            "depth": depth, "n_blocks": n, "stage": st.stage, "tokens_per_s": self.tokens_per_step / dt,
            "wall": round(st.wall, 4),
        }
        record["grad_norm"] = float(grad_norm)
        if own_loss is not None:
            record["own_depth_loss"] = own_loss
        if skipped:
            record["skipped"] = True
        if st.small_flops is not None:
            record["small_flops"] = st.small_flops
        if cfg.method == "staged":
            record["n_embd"] = self.stage_cfg.n_embd
            if not skipped:
                self._history.append((st.flops, train_loss))
            self._maybe_fire_auto()
        if self.peak:
            record["mfu"] = step_flops / dt / self.peak
        return record

    def _forward_backward(self, step: int, lmap: list[int] | None, weight: float, sync_last: bool) -> torch.Tensor:
        """Forward and backward over the step's micro-batches through ``lmap``, the loss scaled by ``weight``;
        gradients are reduced across ranks at the last micro-batch only if ``sync_last``. Returns the summed
        unscaled micro-batch losses (detached)."""
        cfg = self.cfg
        net = self.ddp or self.model
        scale = _scale_kw(self._branch_scale(lmap))
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            # rank r takes micro-batch micro * world + r: disjoint across ranks, the same data as one process
            batch = self.batcher.get(step, micro * self.dist.world + self.dist.rank).to(self.device)
            last = sync_last and micro == cfg.grad_accum - 1  # gradients are reduced across ranks once
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync, _autocast(self.device, self.amp):
                _, loss = net(batch.x, batch.y, layer_map=lmap, loss_chunk=cfg.loss_chunk, **scale)
                (loss * (weight / cfg.grad_accum)).backward()
            loss_sum += loss.detach()
        return loss_sum


def average_shared_grads(model: nn.Module, lmap: list[int]) -> None:
    """Divide each block's gradient by its number of uses in the step: the mean over the layers it ran as,
    instead of autograd's sum (which grows with the depth drawn)."""
    uses: dict[int, int] = {}
    for i in lmap:
        uses[i] = uses.get(i, 0) + 1
    for i, k in uses.items():
        if k > 1:
            for p in model.blocks[i].parameters():
                if p.grad is not None:
                    p.grad.div_(k)


def start_run(cfg: RunConfig, run_dir: Path) -> Trainer:
    """Validate, prepare data and build everything before writing anything into ``run_dir``."""
    import os

    if int(os.environ.get("RANK", "0")) == 0 and ((run_dir / "config.json").exists() or
                                                  (run_dir / "checkpoints").exists()):
        raise UserError(f"{run_dir} already holds a run: continue it with `apollo train --resume {run_dir}`, or "
                        "choose another --out")
    trainer = Trainer(cfg, run_dir)
    trainer.setup()
    if not trainer.dist.is_main:
        barrier(trainer.dist)
        return trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(trainer.corpus.tokenizer, run_dir / "tokenizer.json")
    write_json(run_dir / "model.json", trainer.mcfg.to_dict())
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "data.json", {"train_sources": trainer.corpus.sources,
                                       "valid_sources": trainer.corpus.valid_sources,
                                       "cache_key": trainer.corpus.cache_key,
                                       "train_tokens": int(len(trainer.corpus.train.tokens)),
                                       "valid_tokens": int(len(trainer.corpus.valid.tokens)),
                                       "valid_fraction": None if trainer.corpus.valid_sources else
                                       cfg.valid_fraction})
    barrier(trainer.dist)
    return trainer


def resume_run(run_dir: Path, stop_after: int | None = None, overrides: dict[str, Any] | None = None) -> Trainer:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json): give the --out of an earlier run")
    cfg = RunConfig.from_dict(json.loads(path.read_text()), source=str(path))
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    trainer = Trainer(cfg, run_dir, resume=True, stop_after=stop_after)
    trainer.setup()
    return trainer
