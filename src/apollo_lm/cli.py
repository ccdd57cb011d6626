"""The ``apollo`` command: train, eval, depths, compare, export, generate, glue.

Errors the user can fix print one line (``error: ...``) and exit with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import SAMPLERS, RunConfig, load_config_file
from .errors import UserError

log = logging.getLogger("apollo_lm")

# options that may change when a run is resumed (they do not change what is computed)
RESUME_OVERRIDES = {"device", "progress", "threads", "compile", "parallel", "checkpoint_format", "cache_dir", "log_to",
                    "wandb_project"}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        g = groups.setdefault(meta.get("group", "other"), p.add_argument_group(meta.get("group", "other")))
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.get("help", "")}
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, [], dataclasses.MISSING) and not t.startswith("bool"):
            kw["help"] += f" (default {default})"
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if t.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif "list" in t:
            kw["nargs"] = "+"
            kw["metavar"] = "PATH"
        elif t.startswith("int"):
            kw["type"] = int
        elif t.startswith("float"):
            kw["type"] = float
        g.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apollo", description="Train Transformer language models from scratch, "
                                "faster by growing them while they train.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (from scratch or with a growth method)",
                       description="Train a model. With no arguments: a tiny GPT on Python's own documentation "
                       "text, a few minutes on a laptop CPU.")
    t.add_argument("--config", help="TOML, YAML or JSON file of options (flags override it)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where it stopped")
    t.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop (with a checkpoint) after this step; continue later with --resume")
    _add_run_options(t)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model on some text")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files (any supported format)")
    e.add_argument("--max-tokens", type=int, default=2_000_000, help="score at most this many tokens")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("depths", help="show the depth distribution a sampler produces")
    d.add_argument("--sampler", default="lvps", choices=SAMPLERS)
    d.add_argument("--blocks", type=int, required=True, help="physical blocks n")
    d.add_argument("--depth", type=int, required=True, help="target depth L")
    d.add_argument("--draws", type=int, default=100_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--lvps-low", type=float, default=RunConfig.lvps_low)
    d.add_argument("--lvps-high", type=float, default=RunConfig.lvps_high)
    d.add_argument("--json", action="store_true", help="print {depth: frequency} as one JSON object")
    d.add_argument("--plot", metavar="PNG", help="also save a bar chart")

    c = sub.add_parser("compare", help="how much compute and time growth saved against training from scratch")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run directory of the scratch (baseline) run, then those "
                   "of the methods to compare; with --scratch-flops only the methods' (no scratch run)")
    c.add_argument("--target-loss", type=float, default=None, help="the validation loss to reach (default: the "
                   "scratch run's final one); without a scratch run, its final loss as you know it")
    c.add_argument("--scratch-flops", default=None, metavar="FLOPS|budget", help="for a scratch run known only by "
                   "its final loss (give it as --target-loss): its training FLOPs, e.g. 1.69e14, or 'budget': the "
                   "target model at full depth over each run's own tokens, what a scratch run of the same token "
                   "budget costs")
    c.add_argument("--scratch-wall", type=float, default=None, metavar="SECONDS", help="with --scratch-flops: the "
                   "scratch run's training seconds (evaluation excluded), for the wall-clock saving; only "
                   "meaningful if it ran on the same machine")
    c.add_argument("--out", default=None, help="output directory for compare.json, compare.md and plots "
                   "(default: compare/ next to the scratch run)")
    c.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    _add_ecosystem_parsers(sub)
    return p


def _add_ecosystem_parsers(sub: Any) -> None:
    """export / generate / glue: how a trained model leaves apollo and is judged."""
    x = sub.add_parser("export", help="write a run's model as a Hugging Face transformers model directory",
                       description="Write the latest checkpoint as a transformers model (GPT2LMHeadModel, "
                       "BertForMaskedLM or LlamaForCausalLM) with its tokenizer, loadable by from_pretrained. "
                       "A run still growing is exported at its target depth through its layer map.")
    x.add_argument("run", help="run directory")
    x.add_argument("--to", required=True, metavar="OUT_DIR", help="output directory (must not exist or be empty)")

    g = sub.add_parser("generate", help="sample text from a trained causal model (gpt, llama)")
    g.add_argument("run", help="run directory")
    g.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of probability p")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto")

    u = sub.add_parser("glue", help="fine-tune a trained model on GLUE tasks and report the dev-set metrics",
                       description="Fine-tune on GLUE TSV files laid out as GLUE's download script writes them: "
                       "DATA_DIR/{CoLA,SST-2,MRPC,RTE,STS-B}/{train,dev}.tsv.")
    u.add_argument("run", help="run directory")
    u.add_argument("--task", required=True, help="SST-2, CoLA, MRPC, RTE, STS-B, or all")
    u.add_argument("--data-dir", default=None, help="GLUE data directory (default $APOLLO_GLUE_DIR or ./glue_data)")
    u.add_argument("--epochs", type=float, default=3.0)
    u.add_argument("--lr", type=float, default=2e-5)
    u.add_argument("--batch-size", type=int, default=32)
    u.add_argument("--max-len", type=int, default=128, help="tokens per example (capped by the model's positions)")
    u.add_argument("--max-train", type=int, default=None, help="use at most N training examples")
    u.add_argument("--max-eval", type=int, default=None, help="score at most N dev examples")
    u.add_argument("--dropout", type=float, default=0.1, help="dropout while fine-tuning (BERT's 0.1)")
    u.add_argument("--seed", type=int, default=42)
    u.add_argument("--device", default="auto")
    u.add_argument("--json", action="store_true", help="print the results as one JSON object")


def cmd_train(args: argparse.Namespace) -> int:
    from .train.dist import destroy
    from .train.loop import resume_run, start_run

    given = _given(args)
    if args.resume:
        if args.config:
            raise UserError("--resume continues a run with its own saved config: drop --config")
        extra = sorted(set(given) - RESUME_OVERRIDES)
        if extra:
            raise UserError(f"--resume continues a run with its saved config; these options cannot change: "
                            f"{', '.join('--' + e.replace('_', '-') for e in extra)}")
        trainer = resume_run(Path(args.resume), args.stop_after, given)
    else:
        cfg = build_config(args)
        if cfg.out is None:
            cfg.out = f"runs/{cfg.model}-{cfg.preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        trainer = start_run(cfg, Path(cfg.out))
        trainer.stop_after = args.stop_after
        n_params = sum(p.numel() for p in trainer.model.parameters())
        log.info("run %s: %s %s (%d layers, %d hidden, %d heads, vocab %d), method %s, %.2fM parameters now, "
                 "%d train / %d valid tokens", cfg.out, cfg.model, cfg.preset, trainer.mcfg.n_layer,
                 trainer.mcfg.n_embd, trainer.mcfg.n_head, trainer.mcfg.vocab_size, cfg.method, n_params / 1e6,
                 len(trainer.corpus.train.tokens), len(trainer.corpus.valid.tokens))
        log.info("plan: %s", describe_plan(trainer.plan()))
    last = trainer.train()
    st = trainer.state
    if trainer.done():
        val = st.last_val_loss
        log.info("done: %d steps, %.3g tokens, %.3g FLOPs, %.1f s training (%.1f s in all); final validation loss "
                 "%.4f (perplexity %.1f) at depth %d", st.step, st.tokens, st.flops, st.wall, st.wall_total,
                 val, _exp(val), trainer.mcfg.n_layer)
        log.info("run directory: %s (metrics.jsonl, checkpoints/); evaluate with: apollo eval %s --data FILE",
                 trainer.run_dir, trainer.run_dir)
    info = trainer.dist
    if info.enabled:
        # tear torchrun's process group down while the interpreter is fully alive: left to interpreter shutdown,
        # gloo's worker threads, and the sharded model and optimizer state whose pending work they hold, were seen
        # to abort a rank after a finished run ("terminate called without an active exception", SIGABRT)
        del trainer
        gc.collect()
        destroy(info)
        gc.collect()
    return 0 if last is not None else 1


def describe_plan(plan: dict[str, Any]) -> str:
    """One line for the log: the target's size, the budget per parameter, and a growth run's stages and FLOPs."""
    text = f"the target model has {plan['params'] / 1e6:.3g}M parameters"
    if "tokens" in plan:
        text += f"; {plan['tokens']:.3g} tokens, {plan['tokens_per_param']:.2g} per parameter"
    if "stages" in plan:
        text += "; " + ", ".join(f"{s['blocks']} block{'s' * (s['blocks'] != 1)} for steps "
                                 f"{s['first_step']}-{s['last_step']}" for s in plan["stages"])
        text += f": {100 * plan['flops_fraction']:.1f} % of the FLOPs of training it at full depth as long"
    return text


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The run options on the command line (unset ones are None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}


def build_config(args: argparse.Namespace) -> RunConfig:
    """The validated, resolved RunConfig of a new run: the --config file, overridden by the options given, unset
    architecture options filled from --init-from."""
    values = load_config_file(args.config) if args.config else {}
    values.update(_given(args))
    if values.get("init_from"):
        _fill_from_hf(values)
    cfg = RunConfig.from_dict(values, source=args.config or "options")
    cfg.validate()
    cfg = cfg.resolved()
    cfg.validate()
    return cfg


def _fill_from_hf(values: dict[str, Any]) -> None:
    """Options not given take the --init-from checkpoint's architecture and tokenizer."""
    from .interop.hf import model_config_from_hf

    path = Path(values["init_from"]) / "config.json"
    if not path.is_file():
        raise UserError(f"--init-from {values['init_from']}: no config.json there; give a transformers model "
                        "directory (as written by save_pretrained or apollo export)")
    hf = model_config_from_hf(json.loads(path.read_text()))
    defaults = {"model": hf.family, "n_layer": hf.n_layer, "n_embd": hf.n_embd, "n_head": hf.n_head,
                "seq_len": hf.block_size if hf.family != "llama" else None, "tokenizer": values["init_from"]}
    if hf.family == "llama":
        defaults |= {"n_kv_head": hf.n_kv_head, "tie_embeddings": hf.tie_embeddings}
    for k, v in defaults.items():
        if v is not None and values.get(k) is None:
            values[k] = v


def _exp(x: float | None) -> float:
    import math
    return math.exp(min(x, 50)) if x is not None else float("nan")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.evaluate import evaluate_text, format_eval, load_run

    run = load_run(args.run)
    result = evaluate_text(run, args.data, max_tokens=args.max_tokens, batch_size=args.batch_size,
                           device=args.device)
    print(json.dumps(result) if args.json else format_eval(result))
    return 0


def cmd_depths(args: argparse.Namespace) -> int:
    from .growth.samplers import DepthSampler

    if not 1 <= args.blocks <= args.depth:
        raise UserError(f"--blocks must lie between 1 and --depth ({args.depth}), got {args.blocks}")
    if args.draws < 1:
        raise UserError("--draws must be at least 1")
    s = DepthSampler(args.sampler, args.depth, args.lvps_low, args.lvps_high)
    dist = s.distribution(args.blocks, args.draws, args.seed)
    mean = sum(d * p for d, p in dist.items())
    if args.json:
        print(json.dumps({str(d): p for d, p in dist.items()}))
    else:
        print(f"{args.sampler} sampler, {args.blocks} physical blocks, target depth {args.depth}, "
              f"{args.draws} draws (seed {args.seed}): mean depth {mean:.2f}, "
              f"mean cost {mean / args.depth:.1%} of a full-depth step (blocks only)")
        for d, p in dist.items():
            print(f"  D={d:<3d} {p:7.3f}  {'#' * int(round(p * 60))}")
    if args.plot:
        from .eval.plots import plot_depth_distribution
        plot_depth_distribution(dist, args.plot, f"{args.sampler}: n={args.blocks}, L={args.depth}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare_runs

    flops = args.scratch_flops
    if flops is not None and flops != "budget":
        try:
            flops = float(flops)
        except ValueError:
            raise UserError(f"--scratch-flops takes a number of FLOPs (e.g. 1.69e14) or 'budget', "
                            f"got {flops!r}") from None
    if flops is None and args.scratch_wall is not None:
        raise UserError("--scratch-wall goes with --scratch-flops (a scratch run known by its numbers); with a "
                        "scratch run directory its own time is used")
    if flops is None:
        if len(args.runs) < 2:
            raise UserError("give the scratch run's directory and at least one method run's, or, without a scratch "
                            "run, --target-loss and --scratch-flops")
        scratch, runs = args.runs[0], args.runs[1:]
    else:
        if args.target_loss is None:
            raise UserError("--scratch-flops stands in for a scratch run: give its final validation loss as "
                            "--target-loss too")
        scratch, runs = None, args.runs
    return compare_runs(scratch, runs, args.out, as_json=args.json, target_loss=args.target_loss,
                        scratch_flops=flops, scratch_wall=args.scratch_wall)


def cmd_export(args: argparse.Namespace) -> int:
    from .interop.hf import export_run

    result = export_run(args.run, args.to)
    print(f"{result.architecture} (step {result.step}) written to {result.out_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .eval.generate import generate_from_run

    for text in generate_from_run(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                  args.top_p, args.num_samples, args.seed, args.device):
        print(text)
    return 0


def cmd_glue(args: argparse.Namespace) -> int:
    from .eval.glue import format_results, run_glue

    results = run_glue(args.run, args.task, data_dir=args.data_dir, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, max_len=args.max_len, max_train=args.max_train,
                       max_eval=args.max_eval, dropout=args.dropout, seed=args.seed, device=args.device)
    print(json.dumps(results) if args.json else format_results(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    handlers = {"train": cmd_train, "eval": cmd_eval, "depths": cmd_depths, "compare": cmd_compare}
    handlers |= {"export": cmd_export, "generate": cmd_generate, "glue": cmd_glue}
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if args.command == "train":  # training prints its results to files, not stdout: a broken pipe is a fault
            raise
        # the reader of a report went away (`apollo depths ... | head`): stop quietly, as Unix tools do, and point
        # stdout at /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
