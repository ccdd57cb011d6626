"""``apollo glue``: fine-tune a trained model on GLUE tasks (Wang et al. 2019) and score the dev split.

The paper judges grown BERTs by GLUE after fine-tuning; this reproduces that protocol for any family.
BERT classifies from the [CLS] state through BERT's pooler (tanh dense layer, Devlin et al. 2019, Sec. 3);
GPT and Llama classify from the last real token of ``a <eot> b <eot>`` (Radford et al. 2018, Sec. 3.3).
Regression (STS-B) uses one output and the squared error. Defaults are BERT's: AdamW, lr 2e-5, batch 32,
3 epochs, linear warmup over 10 % of the steps then linear decay, dropout 0.1, weight decay 0.01.

Data layout, as GLUE's download script writes it (``--data-dir``, default ``$APOLLO_GLUE_DIR`` or
``./glue_data``)::

    DATA_DIR/CoLA/{train,dev}.tsv    no header: source, label, original label, sentence
    DATA_DIR/SST-2/{train,dev}.tsv   header: sentence, label
    DATA_DIR/MRPC/{train,dev}.tsv    header (may start with a BOM): Quality, #1 ID, #2 ID, #1 String, #2 String
    DATA_DIR/RTE/{train,dev}.tsv     header: index, sentence1, sentence2, label (entailment/not_entailment)
    DATA_DIR/STS-B/{train,dev}.tsv   header: index, ..., sentence1, sentence2, score (0 to 5)

Metrics (x100, as GLUE reports them): accuracy; Matthews correlation for CoLA; F1 and accuracy for MRPC;
Pearson and Spearman correlation for STS-B. A task's score is the mean of its metrics and ``--task all``
reports the average score over the tasks (the GLUE convention).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.readers import record_lines
from ..data.tokenizer import special_ids
from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    name: str
    text_a: str | int  # column name (files with a header) or index (CoLA)
    text_b: str | int | None
    label: str | int
    header: bool
    labels: tuple[str, ...] | None  # class names in label order; None: regression
    metrics: tuple[str, ...]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("CoLA", 3, None, 1, False, ("0", "1"), ("matthews",)),
    Task("SST-2", "sentence", None, "label", True, ("0", "1"), ("accuracy",)),
    Task("MRPC", "#1 String", "#2 String", "Quality", True, ("0", "1"), ("f1", "accuracy")),
    Task("STS-B", "sentence1", "sentence2", "score", True, None, ("pearson", "spearman")),
    Task("RTE", "sentence1", "sentence2", "label", True, ("not_entailment", "entailment"), ("accuracy",)),
)}


def resolve_tasks(name: str) -> list[Task]:
    """``all`` or one task name (case and hyphen insensitive: sst2, sts-b, cola)."""
    if name.lower() == "all":
        return list(TASKS.values())
    key = {t.lower().replace("-", ""): t for t in TASKS}.get(name.lower().replace("-", ""))
    if key is None:
        raise UserError(f"unknown GLUE task {name!r}: choose one of {', '.join(TASKS)} or all")
    return [TASKS[key]]


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    a: str
    b: str | None
    label: float  # class index, or the similarity score for regression


def read_split(data_dir: str | os.PathLike, task: Task, split: str, limit: int | None = None) -> list[Example]:
    """Examples of ``DATA_DIR/TASK/SPLIT.tsv``; rows with missing fields are skipped (as GLUE's loaders do)."""
    path = Path(data_dir) / task.name / f"{split}.tsv"
    if not path.is_file():
        raise UserError(f"{path} is missing: give --data-dir the GLUE directory holding {task.name}/train.tsv and "
                        f"{task.name}/dev.tsv (the layout GLUE's download script writes)")
    # no CSV quoting: GLUE's sentences contain bare quote characters; utf-8-sig drops MRPC's byte-order mark
    lines = record_lines(path.read_text(encoding="utf-8-sig"))  # read_text turns "\r\n" into "\n"
    rows = [line.split("\t") for line in lines if line.strip()]
    columns: dict[str | int, int] = {}
    if task.header:
        columns = {name.strip(): i for i, name in enumerate(rows.pop(0))}
    def col(key: str | int) -> int:
        if isinstance(key, int):
            return key
        if key not in columns:
            raise UserError(f"{path} has no column {key!r} in its header: is it the {task.name} file from GLUE?")
        return columns[key]

    ia, ib, il = col(task.text_a), None if task.text_b is None else col(task.text_b), col(task.label)
    out: list[Example] = []
    for r in rows:
        if len(r) <= max(ia, il, ib or 0):
            continue
        raw = r[il].strip()
        if task.labels is None:
            try:
                label = float(raw)
            except ValueError:
                continue
        elif raw in task.labels:
            label = float(task.labels.index(raw))
        else:
            continue
        out.append(Example(r[ia], None if ib is None else r[ib], label))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path} holds no {task.name} examples: check that it is the GLUE file")
    return out


def encode(tok: Any, family: str, examples: Sequence[Example], max_len: int) -> dict[str, torch.Tensor]:
    """Padded token ids, segment ids and attention masks: ``[CLS] a [SEP] b [SEP]`` for BERT,
    ``a <eot> b <eot>`` for causal models. Pairs are truncated longest-first to ``max_len``."""
    ids = special_ids(tok, family)
    firsts = [e.ids for e in tok.encode_batch([x.a for x in examples], add_special_tokens=False)]
    seconds = [e.ids for e in tok.encode_batch([x.b or "" for x in examples], add_special_tokens=False)]
    rows, types = [], []
    for x, a, b in zip(examples, firsts, seconds):
        b = b if x.b is not None else None
        n_special = (3 if b is not None else 2) if family == "bert" else (2 if b is not None else 1)
        a, b = list(a), None if b is None else list(b)
        while len(a) + len(b or []) + n_special > max_len and (a or b):
            (b if b is not None and len(b) > len(a) else a).pop()
        if family == "bert":
            seq = [ids.cls, *a, ids.separator] + ([] if b is None else [*b, ids.separator])
            seg = [0] * (len(a) + 2) + ([] if b is None else [1] * (len(b) + 1))
        else:
            seq = [*a] + ([] if b is None else [ids.separator, *b]) + [ids.separator]
            seg = [0] * len(seq)
        rows.append(seq)
        types.append(seg)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), ids.pad, dtype=torch.long)
    token_types = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, types)):
        input_ids[i, :len(r)] = torch.tensor(r)
        token_types[i, :len(s)] = torch.tensor(s)
        mask[i, :len(r)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- model
class SequenceClassifier(nn.Module):
    """A pretrained apollo model with a classification (or regression) head."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        d = backbone.config.n_embd
        self.backbone = backbone
        self.family = backbone.family
        self.pooler = nn.Linear(d, d) if self.family == "bert" else None  # BERT's pooler: tanh(W h_[CLS] + b)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d, num_labels)
        for layer in (self.pooler, self.head):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":
            h = self.backbone.hidden(input_ids, None, token_type_ids, attention_mask)  # (B, T, C)
            pooled = torch.tanh(self.pooler(h[:, 0]))
        else:  # right padding never reaches earlier positions of a causal model
            h = self.backbone.hidden(input_ids)
            last = attention_mask.sum(1) - 1
            pooled = h[torch.arange(h.size(0), device=h.device), last]
        return self.head(self.dropout(pooled))


def _backbone(run: Any, dropout: float) -> nn.Module:
    """The run's model at its target depth (layer map materialised, so layers fine-tune separately)."""
    from ..interop.hf import materialize_layer_map
    from ..models import build_model
    from ..train.checkpoint import load_model_state, model_state

    cfg = dataclasses.replace(run.mcfg, dropout=dropout)
    sd = {k: v.detach().clone() for k, v in model_state(run.model).items()}
    if run.target_map is not None:
        sd = materialize_layer_map(sd, run.target_map)
    model = build_model(cfg)
    load_model_state(model, sd, what=f"run {run.checkpoint}")
    return model


# ---------------------------------------------------------------------------------------------- metrics
def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class (MRPC's 'paraphrase')."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation coefficient; 0 when a row or column of the confusion matrix is empty."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom else 0.0


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's coefficient requires)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    r = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


# ---------------------------------------------------------------------------------------------- training
def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(clf: SequenceClassifier, data: dict[str, torch.Tensor], batch_size: int, device: torch.device,
            amp: torch.dtype | None) -> np.ndarray:
    clf.eval()
    outs = []
    for idx in _batches(len(data["input_ids"]), batch_size, None):
        batch = {k: v[idx].to(device) for k, v in data.items()}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outs.append(clf(**batch).float().cpu())
    return torch.cat(outs).numpy()


def finetune_task(run: Any, task: Task, data_dir: str | os.PathLike, epochs: float = 3.0, lr: float = 2e-5,
                  batch_size: int = 32, max_len: int = 128, max_train: int | None = None,
                  max_eval: int | None = None, dropout: float = 0.1, seed: int = 42,
                  device: str = "auto") -> dict[str, Any]:
    """Fine-tune a fresh copy of the run's model on one task and score the dev split."""
    from ..train.wrap import autocast_dtype, resolve_device

    train = read_split(data_dir, task, "train", max_train)
    dev = read_split(data_dir, task, "dev", max_eval)
    family = run.mcfg.family
    length = min(max_len, run.mcfg.block_size)
    train_data = encode(run.tokenizer, family, train, length)
    dev_data = encode(run.tokenizer, family, dev, length)
    train_y = torch.tensor([x.label for x in train])
    gold = np.array([x.label for x in dev])
    dev_device = resolve_device(device)
    amp = autocast_dtype("auto", dev_device)
    torch.manual_seed(seed)
    regression = task.labels is None
    clf = SequenceClassifier(_backbone(run, dropout), 1 if regression else len(task.labels), dropout).to(dev_device)
    decay = [p for p in clf.parameters() if p.dim() >= 2]
    no_decay = [p for p in clf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = max(1, int(0.1 * total))
    step, losses = 0, []
    while step < total:
        clf.train()
        for idx in _batches(len(train), batch_size, rng):
            if step >= total:
                break
            scale = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            batch = {k: v[idx].to(dev_device) for k, v in train_data.items()}
            y = train_y[idx].to(dev_device)
            with torch.autocast(dev_device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = clf(**batch).float()
            loss = F.mse_loss(out.squeeze(-1), y) if regression else F.cross_entropy(out, y.long())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    out = predict(clf, dev_data, batch_size, dev_device, amp)
    pred = out[:, 0] if regression else out.argmax(-1).astype(np.float64)
    metrics = {m: 100.0 * METRICS[m](pred, gold) for m in task.metrics}
    log.info("%s: %s after %d steps (train loss %.4f -> %.4f)", task.name,
             ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()), total, losses[0], losses[-1])
    return {"metrics": metrics, "score": float(np.mean(list(metrics.values()))), "train_examples": len(train),
            "dev_examples": len(dev), "steps": total, "final_train_loss": losses[-1]}


def run_glue(run_dir: str | os.PathLike, task: str, data_dir: str | os.PathLike | None = None,
             **kw: Any) -> dict[str, Any]:
    """``apollo glue``: each requested task fine-tuned from the same pretrained checkpoint."""
    from .evaluate import load_run

    tasks = resolve_tasks(task)
    data = Path(data_dir or os.environ.get("APOLLO_GLUE_DIR", "glue_data"))
    if not data.is_dir():
        raise UserError(f"GLUE data directory {data} does not exist: pass --data-dir DIR holding "
                        "TASK/train.tsv and TASK/dev.tsv (or set APOLLO_GLUE_DIR)")
    for t in tasks:  # fail before any training when a task's files are missing
        for split in ("train", "dev"):
            if not (data / t.name / f"{split}.tsv").is_file():
                raise UserError(f"{data / t.name / (split + '.tsv')} is missing: put GLUE's {t.name} files there "
                                "or choose another --task")
    _check(kw)
    run = load_run(run_dir)
    results = {t.name: finetune_task(run, t, data, **kw) for t in tasks}
    out: dict[str, Any] = {"run": str(run_dir), "checkpoint_step": run.step, "family": run.mcfg.family,
                           "tasks": results, "settings": kw}
    if len(results) > 1:
        out["average"] = float(np.mean([r["score"] for r in results.values()]))
    return out


def _check(kw: dict[str, Any]) -> None:
    for name in ("batch_size", "max_len", "max_train", "max_eval"):
        v = kw.get(name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if kw.get("epochs", 1) <= 0 or kw.get("lr", 1) <= 0:
        raise UserError("--epochs and --lr must be positive")
    if not 0 <= kw.get("dropout", 0) < 1:
        raise UserError(f"--dropout must lie in [0, 1), got {kw.get('dropout')}")


def format_results(results: dict[str, Any]) -> str:
    lines = [f"GLUE dev results for {results['run']} (step {results['checkpoint_step']}, {results['family']})",
             f"  {'task':<7} {'metrics':<34} {'score':>6}"]
    for name, r in results["tasks"].items():
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
        lines.append(f"  {name:<7} {metrics:<34} {r['score']:6.1f}")
    if "average" in results:
        lines.append(f"  {'average':<42} {results['average']:6.1f}")
    return "\n".join(lines)
