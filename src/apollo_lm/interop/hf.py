"""Hugging Face ``transformers`` checkpoints, both ways: ``apollo export`` and :func:`import_hf`.

Every family maps name by name onto the standard architecture users' tooling already understands:
GPT -> ``GPT2LMHeadModel``, BERT -> ``BertForMaskedLM``, Llama -> ``LlamaForCausalLM``. The maps are one
table per family of (apollo name, HF name, how to convert), read forwards by export and backwards by import,
so the two directions cannot drift apart. Conversions: GPT-2 keeps its matrices in ``Conv1D`` layout
(in, out), the transpose of ``nn.Linear``; BERT splits our fused query/key/value projection into three.

A run still in a sampling stage (fewer physical blocks than the target depth L) is exported at depth L:
block ``g(t)`` of its layer map is copied into layer ``t`` (the model as the paper evaluates it mid-run,
method.md), and the export says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config import ModelConfig
from ..data.tokenizer import BERT_SPECIALS, special_ids
from ..errors import UserError
from ..models import build_model
from ..models.llama import DEFAULT_NORM_EPS, kv_heads, mlp_hidden_size
from ..train.checkpoint import load_model_state, model_state

log = logging.getLogger(__name__)

GPT_LN_EPS = 1e-5  # torch's LayerNorm default, what GPT-2 uses
BERT_LN_EPS = 1e-12
HF_TYPES = {"gpt": "gpt2", "bert": "bert", "llama": "llama"}
FAMILY_OF = {v: k for k, v in HF_TYPES.items()}

# (apollo name, HF name, conversion): "" copies, "T" transposes, "q"/"k"/"v" is one third of a fused qkv
Pair = tuple[str, str, str]


def _pairs(family: str, n_layer: int, tie: bool = True) -> list[Pair]:
    """The name map of one family at ``n_layer`` layers (tied head weights are added by the caller)."""
    out: list[Pair] = []
    if family == "gpt":
        out += [("wte.weight", "transformer.wte.weight", ""), ("wpe.weight", "transformer.wpe.weight", "")]
        for i in range(n_layer):
            a, h = f"blocks.{i}.", f"transformer.h.{i}."
            for name in ("ln_1", "ln_2"):
                out += [(a + f"{name}.weight", h + f"{name}.weight", ""), (a + f"{name}.bias", h + f"{name}.bias", "")]
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out += [(a + f"{name}.weight", h + f"{name}.weight", "T"), (a + f"{name}.bias", h + f"{name}.bias", "")]
        out += [("ln_f.weight", "transformer.ln_f.weight", ""), ("ln_f.bias", "transformer.ln_f.bias", "")]
    elif family == "bert":
        e = "bert.embeddings."
        out += [("word_embeddings.weight", e + "word_embeddings.weight", ""),
                ("position_embeddings.weight", e + "position_embeddings.weight", ""),
                ("token_type_embeddings.weight", e + "token_type_embeddings.weight", ""),
                ("emb_ln.weight", e + "LayerNorm.weight", ""), ("emb_ln.bias", e + "LayerNorm.bias", "")]
        for i in range(n_layer):
            a, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
            for part, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
                for p in ("weight", "bias"):
                    out.append((a + f"attn.qkv.{p}", h + f"attention.self.{hf_name}.{p}", part))
            for ours, theirs in (("attn.proj", "attention.output.dense"), ("ln_1", "attention.output.LayerNorm"),
                                 ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"),
                                 ("ln_2", "output.LayerNorm")):
                for p in ("weight", "bias"):
                    out.append((a + f"{ours}.{p}", h + f"{theirs}.{p}", ""))
        c = "cls.predictions."
        out += [("head_dense.weight", c + "transform.dense.weight", ""),
                ("head_dense.bias", c + "transform.dense.bias", ""),
                ("head_ln.weight", c + "transform.LayerNorm.weight", ""),
                ("head_ln.bias", c + "transform.LayerNorm.bias", ""), ("head_bias", c + "bias", "")]
    elif family == "llama":
        out.append(("wte.weight", "model.embed_tokens.weight", ""))
        for i in range(n_layer):
            a, h = f"blocks.{i}.", f"model.layers.{i}."
            out += [(a + "attn_norm.weight", h + "input_layernorm.weight", ""),
                    (a + "mlp_norm.weight", h + "post_attention_layernorm.weight", "")]
            out += [(a + f"attn.{p}.weight", h + f"self_attn.{p}.weight", "") for p in ("q_proj", "k_proj", "v_proj",
                                                                                       "o_proj")]
            out += [(a + f"mlp.{p}.weight", h + f"mlp.{p}.weight", "") for p in ("gate_proj", "up_proj", "down_proj")]
        out.append(("norm.weight", "model.norm.weight", ""))
        if not tie:
            out.append(("lm_head.weight", "lm_head.weight", ""))
    else:
        raise UserError(f"no Hugging Face mapping for model family {family!r}")
    return out


def _tied(family: str, tie: bool) -> dict[str, str]:
    """HF names that hold a copy of another HF tensor (tied in the HF model) -> the name they copy."""
    if family == "gpt":
        return {"lm_head.weight": "transformer.wte.weight"}
    if family == "bert":
        return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    return {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}


def to_hf_state(sd: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights (all ``n_layer`` blocks present) as the HF model's ``state_dict``, tied names included."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _pairs(mcfg.family, mcfg.n_layer, mcfg.tie_embeddings):
        w = sd[ours]
        if how == "T":
            w = w.t()
        elif how:
            w = w.chunk(3, dim=0)["qkv".index(how)]
        out[theirs] = w.contiguous().clone()
    for name, source in _tied(mcfg.family, mcfg.tie_embeddings).items():
        out[name] = out[source]
    return out


def from_hf_state(hf: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf_state`: HF weights under our names (fused qkv re-assembled)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for ours, theirs, how in _pairs(mcfg.family, mcfg.n_layer, mcfg.tie_embeddings):
        if theirs not in hf:
            raise UserError(f"the Hugging Face checkpoint lacks {theirs}: it is not a complete "
                            f"{HF_TYPES[mcfg.family]} model")
        w = hf[theirs].float()
        if how == "T":
            out[ours] = w.t().contiguous()
        elif how:
            parts.setdefault(ours, {})[how] = w
        else:
            out[ours] = w.clone()
    for ours, qkv in parts.items():
        out[ours] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def materialize_layer_map(sd: dict[str, torch.Tensor], layer_map: list[int]) -> dict[str, torch.Tensor]:
    """Weights with one block per logical layer: block ``t`` is a copy of block ``layer_map[t]``."""
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for t, src in enumerate(layer_map):
        prefix = f"blocks.{src}."
        for k, v in sd.items():
            if k.startswith(prefix):
                out[f"blocks.{t}." + k[len(prefix):]] = v.clone()
    return out


# ---------------------------------------------------------------------------------------------- configs
def hf_config(mcfg: ModelConfig, tok: Tokenizer) -> Any:
    """The ``transformers`` config equivalent to ``mcfg`` (dropouts carried over, special tokens set)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    ids = special_ids(tok, mcfg.family)
    common = {"vocab_size": mcfg.vocab_size, "dtype": "float32"}
    if mcfg.family == "gpt":
        return GPT2Config(n_positions=mcfg.block_size, n_embd=mcfg.n_embd, n_layer=mcfg.n_layer,
                          n_head=mcfg.n_head, n_inner=mcfg.mlp_ratio * mcfg.n_embd,
                          activation_function="gelu_new",  # the tanh approximation our GPT uses
                          resid_pdrop=mcfg.dropout, embd_pdrop=mcfg.dropout, attn_pdrop=mcfg.dropout,
                          layer_norm_epsilon=GPT_LN_EPS, bos_token_id=ids.separator, eos_token_id=ids.separator,
                          tie_word_embeddings=True, architectures=["GPT2LMHeadModel"], **common)
    if mcfg.family == "bert":
        return BertConfig(hidden_size=mcfg.n_embd, num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head,
                          intermediate_size=mcfg.mlp_ratio * mcfg.n_embd, hidden_act="gelu",
                          hidden_dropout_prob=mcfg.dropout, attention_probs_dropout_prob=mcfg.dropout,
                          max_position_embeddings=mcfg.block_size, type_vocab_size=mcfg.type_vocab_size,
                          layer_norm_eps=BERT_LN_EPS, pad_token_id=ids.pad, tie_word_embeddings=True,
                          architectures=["BertForMaskedLM"], **common)
    return LlamaConfig(hidden_size=mcfg.n_embd, intermediate_size=mlp_hidden_size(mcfg),
                       num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head,
                       num_key_value_heads=kv_heads(mcfg), hidden_act="silu",
                       max_position_embeddings=mcfg.block_size, rms_norm_eps=mcfg.norm_eps or DEFAULT_NORM_EPS,
                       rope_parameters={"rope_type": "default", "rope_theta": float(mcfg.rope_theta)},
                       attention_bias=False, mlp_bias=False, attention_dropout=mcfg.dropout,
                       tie_word_embeddings=mcfg.tie_embeddings, bos_token_id=ids.separator,
                       eos_token_id=ids.separator, architectures=["LlamaForCausalLM"], **common)


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """Our architecture for a HF ``config.json``; features our models lack are a :class:`UserError`."""
    mtype = config.get("model_type")
    if mtype not in FAMILY_OF:
        raise UserError(f"model_type {mtype!r} is not supported: apollo imports gpt2, bert and llama checkpoints")

    def ratio(inner: int | None, d: int) -> int:
        if inner is None:
            return 4
        if inner % d:
            raise UserError(f"MLP size {inner} is not a multiple of the hidden size {d}: apollo's {mtype} needs one")
        return inner // d

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise UserError(f"this {mtype} checkpoint uses {what}, which apollo's model does not implement")

    if mtype == "gpt2":
        need(config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"activation {config.get('activation_function')!r}")
        need(abs(config.get("layer_norm_epsilon", GPT_LN_EPS) - GPT_LN_EPS) < 1e-12, "another LayerNorm epsilon")
        need(config.get("tie_word_embeddings", True), "an untied output head")
        need(not config.get("scale_attn_by_inverse_layer_idx") and not config.get("add_cross_attention"),
             "layer-scaled or cross attention")
        d = config["n_embd"]
        return ModelConfig("gpt", config["n_layer"], d, config["n_head"], config["vocab_size"],
                           config.get("n_positions", 1024), mlp_ratio=ratio(config.get("n_inner"), d))
    if mtype == "bert":
        need(config.get("hidden_act", "gelu") == "gelu", f"activation {config.get('hidden_act')!r}")
        need(config.get("position_embedding_type", "absolute") == "absolute", "relative position embeddings")
        need(abs(config.get("layer_norm_eps", BERT_LN_EPS) - BERT_LN_EPS) < 1e-15, "another LayerNorm epsilon")
        d = config["hidden_size"]
        return ModelConfig("bert", config["num_hidden_layers"], d, config["num_attention_heads"],
                           config["vocab_size"], config.get("max_position_embeddings", 512),
                           mlp_ratio=ratio(config.get("intermediate_size"), d),
                           type_vocab_size=config.get("type_vocab_size", 2))
    d, nh = config["hidden_size"], config["num_attention_heads"]
    need(config.get("hidden_act", "silu") == "silu", f"activation {config.get('hidden_act')!r}")
    need(not config.get("attention_bias") and not config.get("mlp_bias"), "biases")
    need(config.get("head_dim") in (None, d // nh), "a head size other than hidden_size / heads")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    need(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    mcfg = ModelConfig("llama", config["num_hidden_layers"], d, nh, config["vocab_size"],
                       config.get("max_position_embeddings", 2048),
                       n_kv_head=config.get("num_key_value_heads") or nh,
                       tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=float(theta),
                       intermediate_size=config.get("intermediate_size", 11008),
                       norm_eps=config.get("rms_norm_eps", 1e-6))
    # values equal to our defaults are left unset, so an exported-then-imported config equals the original
    if mcfg.n_kv_head == nh:
        mcfg.n_kv_head = None
    if mcfg.norm_eps == DEFAULT_NORM_EPS:
        mcfg.norm_eps = None
    if mcfg.intermediate_size == mlp_hidden_size(dataclasses.replace(mcfg, intermediate_size=None)):
        mcfg.intermediate_size = None
    return mcfg


# ---------------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    step: int
    materialized_map: list[int] | None  # the layer map copied into layers (None: exported as trained)


def save_hf_tokenizer(tok: Tokenizer, family: str, out_dir: Path, max_length: int) -> None:
    """tokenizer.json plus tokenizer_config.json with the special tokens, loadable by ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    if family == "bert":
        pad, unk, cls, sep, mask = BERT_SPECIALS
        specials = {"pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep, "mask_token": mask,
                    "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}  # segments for pairs
    else:
        eot = tok.id_to_token(special_ids(tok, family).separator)
        specials = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials)
    fast.save_pretrained(str(out_dir))
    # the class name transformers 4.x and 5.x both resolve (5.x alone knows "TokenizersBackend")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def hf_model_class(family: str) -> Any:
    import transformers

    return {"gpt": transformers.GPT2LMHeadModel, "bert": transformers.BertForMaskedLM,
            "llama": transformers.LlamaForCausalLM}[family]


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty: choose another --to or remove it")
    return out


def export_model(model: nn.Module, mcfg: ModelConfig, tok: Tokenizer, out_dir: str | os.PathLike,
                 layer_map: list[int] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (run through ``layer_map`` when given) as a transformers model directory.

    Written under a temporary name next to ``out_dir`` and renamed, so an interrupted export leaves nothing
    that looks complete.
    """
    out = _check_out_dir(out_dir)
    sd = {k: v.detach().float().cpu() for k, v in model_state(model).items()}
    if layer_map is not None:
        sd = materialize_layer_map(sd, layer_map)
    hf_state = to_hf_state(sd, mcfg)
    config = hf_config(mcfg, tok)
    hf_model = hf_model_class(mcfg.family)(config)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"export mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one shard of a small model: the bar is noise in the CLI output
    try:
        hf_model.save_pretrained(str(tmp))
        save_hf_tokenizer(tok, mcfg.family, tmp, mcfg.block_size)
        (tmp / "apollo_export.json").write_text(json.dumps(extra or {}, indent=1))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return out


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> ExportResult:
    """``apollo export``: the latest checkpoint of a run as a transformers model at its target depth."""
    from ..eval.evaluate import load_run

    _check_out_dir(out_dir)
    run = load_run(run_dir)
    tmap = run.target_map
    materialized = tmap if tmap is not None else run.grown_from
    if materialized is not None:
        log.info("the run is mid-way through growth (%d physical blocks, target depth %d): exporting it at depth "
                 "%d by copying block g(t) into layer t%s, g = %s", run.n_blocks, run.mcfg.n_layer,
                 run.mcfg.n_layer, " (output projections divided by the copies, --repeat-scale uses)"
                 if tmap is None else "", materialized)
    extra = {"source_run": str(Path(run_dir).resolve()), "checkpoint": str(run.checkpoint), "step": run.step,
             "physical_blocks": run.n_blocks, "depth": run.mcfg.n_layer, "materialized_layer_map": materialized,
             "repeat_scale": run.cfg.repeat_scale or "none"}
    out = export_model(run.model, run.mcfg, run.tokenizer, out_dir, tmap, extra)
    arch = hf_model_class(run.mcfg.family).__name__
    log.info("exported step %d of %s as %s to %s", run.step, run_dir, arch, out)
    return ExportResult(out, arch, run.step, materialized)


# ---------------------------------------------------------------------------------------------- import
def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json): give a directory "
                        "written by save_pretrained or apollo export")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def load_hf_tokenizer(hf_dir: Path) -> Tokenizer:
    """The fast tokenizer of a HF model directory (tokenizer.json, or converted by AutoTokenizer)."""
    if (hf_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{hf_dir} has no tokenizer.json and its tokenizer could not be loaded ({e}): add one, or "
                        "pass --tokenizer") from None


def import_hf(hf_dir: str | os.PathLike) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """A transformers checkpoint (gpt2, bert, llama) as apollo's model, its config and tokenizer.

    The starting point for continued training or for growing it (bert2BERT, Chen et al. 2022, initialises a
    large model from a small pretrained one): the model computes the same logits as the HF one.
    """
    path = Path(hf_dir)
    mcfg = model_config_from_hf(_read_hf_config(path))
    import transformers

    auto = transformers.AutoModelForMaskedLM if mcfg.family == "bert" else transformers.AutoModelForCausalLM
    try:
        hf_model = auto.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"could not load the weights in {path} ({type(e).__name__}: {e})") from None
    sd = from_hf_state(hf_model.state_dict(), mcfg)
    model = build_model(mcfg)
    load_model_state(model, sd, what=f"Hugging Face checkpoint {path}")
    model.eval()
    return model, mcfg, load_hf_tokenizer(path)


def init_weights_from_hf(hf_dir: str | os.PathLike, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights of a HF checkpoint for a run of architecture ``mcfg`` (a hook for ``train --init-from``).

    The checkpoint may be shallower than ``mcfg.n_layer`` (a small model to grow, as bert2BERT): the result
    then holds its blocks only, to start the run's first stage with that many physical blocks.
    """
    model, src, _ = import_hf(hf_dir)
    ours, theirs = _shape_fields(mcfg), _shape_fields(src)
    diff = [f for f in ours if ours[f] != theirs[f]]
    short = mcfg.family != "llama" and src.block_size < mcfg.block_size
    if diff or src.n_layer > mcfg.n_layer or short:
        what = ", ".join(f"{f} {theirs[f]} (run: {ours[f]})" for f in diff) or \
            f"{src.n_layer} layers and {src.block_size} positions (run: {mcfg.n_layer}, {mcfg.block_size})"
        raise UserError(f"{hf_dir} does not fit this run's model: {what}; set the run's options to match it")
    sd = model_state(model)
    if mcfg.family != "llama" and src.block_size > mcfg.block_size:  # a shorter position table: keep its head
        key = "wpe.weight" if mcfg.family == "gpt" else "position_embeddings.weight"
        sd[key] = sd[key][: mcfg.block_size].clone()
    return sd


def _shape_fields(mcfg: ModelConfig) -> dict[str, Any]:
    """What two configs must share for weights to carry over (family defaults resolved)."""
    out = {"family": mcfg.family, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head, "vocab_size": mcfg.vocab_size}
    if mcfg.family == "llama":
        out |= {"n_kv_head": kv_heads(mcfg), "tie_embeddings": mcfg.tie_embeddings, "rope_theta": mcfg.rope_theta,
                "mlp_hidden": mlp_hidden_size(mcfg), "norm_eps": mcfg.norm_eps or DEFAULT_NORM_EPS}
    else:
        out |= {"mlp_ratio": mcfg.mlp_ratio}
    if mcfg.family == "bert":
        out["type_vocab_size"] = mcfg.type_vocab_size
    return out
