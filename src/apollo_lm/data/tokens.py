"""Token files: tokenize the corpus once into flat memory-mapped arrays, cached by (inputs, tokenizer).

Layout: every document's token ids followed by the separator id, concatenated; uint16 when the vocabulary
fits, else uint32. ``meta.json`` beside the arrays records token and UTF-8 byte counts (for bits per byte).
When no validation files are given, every document ``i`` with ``floor((i+1)f) > floor(i f)`` is held out
(``f`` the valid fraction): an evenly spaced, deterministic selection of whole documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import UserError
from .readers import default_corpus, expand_sources, iter_documents, source_fingerprint
from .tokenizer import SpecialIds, encode_documents, load_tokenizer, save_tokenizer, special_ids, train_tokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = 1
CHUNK_DOCS = 2000


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("APOLLO_CACHE") or os.path.join(Path.home(), ".cache", "apollo_lm")
    return Path(root)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class TokenSplit:
    tokens: np.ndarray  # memory-mapped
    n_bytes: int  # UTF-8 bytes of the text these tokens came from
    n_docs: int

    @property
    def tokens_per_byte(self) -> float:
        return len(self.tokens) / max(1, self.n_bytes)


@dataclass
class Corpus:
    tokenizer: Tokenizer
    ids: SpecialIds
    train: TokenSplit
    valid: TokenSplit
    cache_key: str
    sources: list[str]
    valid_sources: list[str]


def _chunks(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _docs(sources: list[str], text_field: str, txt_docs: str) -> Iterator[str]:
    if not sources:
        return iter(default_corpus())
    return iter_documents(sources, text_field, txt_docs)


def _fingerprint(sources: list[str]) -> list:
    if not sources:
        return [["pydoc_data.topics", sys.version_info[:2]]]
    return source_fingerprint(sources)


def get_tokenizer(cfg, sources: list[str]) -> Tokenizer:
    """The run's tokenizer: loaded from --tokenizer, or trained on the training text (cached)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    key = _key(["tok", CACHE_VERSION, _fingerprint(sources), cfg.model, cfg.vocab_size, cfg.tokenizer_sample,
                cfg.text_field, cfg.txt_docs] + (["canonical ids"] if cfg.model == "bert" else []))
    path = cache_root(cfg.cache_dir) / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        log.info("using cached tokenizer %s", path)
        return load_tokenizer(str(path))
    kind = "WordPiece" if cfg.model == "bert" else "byte-level BPE"
    log.info("training a %s tokenizer (vocabulary %d) on the training text", kind, cfg.vocab_size)
    tok = train_tokenizer(_docs(sources, cfg.text_field, cfg.txt_docs), cfg.model, cfg.vocab_size,
                          cfg.tokenizer_sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, path)
    return tok


def _write_tokens(tok: Tokenizer, sep: int, docs: Iterable[str], dtype, out: dict[str, Path],
                  holdout: float | None) -> dict[str, dict]:
    """Tokenize ``docs`` into out['train'] (and out['valid'] when holding out a fraction)."""
    files = {name: open(p, "wb") for name, p in out.items()}
    stats = {name: {"tokens": 0, "bytes": 0, "docs": 0} for name in out}
    i = 0
    try:
        for chunk in _chunks(docs, CHUNK_DOCS):
            for text, ids in zip(chunk, encode_documents(tok, chunk)):
                name = "train" if "train" in files else "valid"
                if holdout is not None and int((i + 1) * holdout) > int(i * holdout):
                    name = "valid"
                i += 1
                if not ids:
                    continue
                arr = np.asarray(ids + [sep], dtype=dtype)
                files[name].write(arr.tobytes())
                s = stats[name]
                s["tokens"] += len(arr)
                s["bytes"] += len(text.encode("utf-8"))
                s["docs"] += 1
    finally:
        for f in files.values():
            f.close()
    return stats


def _open_split(path: Path, dtype, stats: dict) -> TokenSplit:
    if stats["tokens"] == 0:
        arr = np.zeros(0, dtype=dtype)
    else:
        arr = np.memmap(path, dtype=dtype, mode="r")
    return TokenSplit(tokens=arr, n_bytes=stats["bytes"], n_docs=stats["docs"])


def tokenize_to_cache(tok: Tokenizer, family: str, train_sources: list[str], valid_sources: list[str], cfg,
                      holdout: float | None) -> tuple[str, dict[str, TokenSplit]]:
    ids = special_ids(tok, family)
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
    key = _key(["tokens", CACHE_VERSION, _fingerprint(train_sources), _fingerprint(valid_sources) if valid_sources
                else None, hashlib.sha256(tok.to_str().encode()).hexdigest(), family, cfg.text_field, cfg.txt_docs,
                holdout])
    root = cache_root(cfg.cache_dir) / "tokens" / key
    meta_path = root / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("using cached token files %s", root)
        return key, {name: _open_split(root / f"{name}.bin", np.dtype(meta["dtype"]), meta[name])
                     for name in ("train", "valid")}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root.parent))
    try:
        log.info("tokenizing the training text (cached for later runs)")
        names = {"train": tmp / "train.bin"}
        if holdout is not None:
            names["valid"] = tmp / "valid.bin"
        stats = _write_tokens(tok, ids.separator, _docs(train_sources, cfg.text_field, cfg.txt_docs), dtype,
                              names, holdout)
        if holdout is None:
            log.info("tokenizing the validation text")
            stats.update(_write_tokens(tok, ids.separator, iter_documents(valid_sources, cfg.text_field,
                                                                          cfg.txt_docs),
                                       dtype, {"valid": tmp / "valid.bin"}, None))
        for name in ("train", "valid"):
            (tmp / f"{name}.bin").touch()
        meta = {"dtype": np.dtype(dtype).name, **stats, "train_sources": train_sources,
                "valid_sources": valid_sources, "holdout": holdout}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tokenize_to_cache(tok, family, train_sources, valid_sources, cfg, holdout)


def prepare_corpus(cfg, tokenizer: Tokenizer | None = None) -> Corpus:
    """Tokenizer and token files for a resolved :class:`~apollo_lm.config.RunConfig`."""
    sources = expand_sources(cfg.data) if cfg.data else []
    valid_sources = expand_sources(cfg.valid) if cfg.valid else []
    tok = tokenizer or get_tokenizer(cfg, sources)
    holdout = None if valid_sources else cfg.valid_fraction
    if holdout is not None and holdout <= 0:
        raise UserError("no validation data: give --valid FILES or a --valid-fraction above 0")
    key, splits = tokenize_to_cache(tok, cfg.model, sources, valid_sources, cfg, holdout)
    train, valid = splits["train"], splits["valid"]
    what = " ".join(cfg.data) if cfg.data else "the built-in corpus"
    if len(train.tokens) == 0:
        raise UserError(f"no training text found in {what}: the files are empty or hold no "
                        f"{cfg.text_field!r} text")
    need = cfg.seq_len + 1
    if len(train.tokens) < need * 2:
        raise UserError(f"the training text has {len(train.tokens)} tokens, too few for even one batch of "
                        f"sequence length {cfg.seq_len}: give more text or a smaller --seq-len")
    if len(valid.tokens) < need:
        if holdout is not None:
            raise UserError(f"holding out {holdout:g} of {train.n_docs + valid.n_docs} documents leaves "
                            f"{len(valid.tokens)} validation tokens, fewer than one sequence ({cfg.seq_len}): "
                            "give --valid FILES or raise --valid-fraction")
        raise UserError(f"the validation text has {len(valid.tokens)} tokens, fewer than one sequence "
                        f"({cfg.seq_len}): give more validation text or a smaller --seq-len")
    return Corpus(tokenizer=tok, ids=special_ids(tok, cfg.model), train=train, valid=valid, cache_key=key,
                  sources=sources, valid_sources=valid_sources)
