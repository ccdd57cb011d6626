"""Tokenizers from Hugging Face `tokenizers`: train a byte-level BPE (causal models) or WordPiece (BERT), or load one.

Special tokens: causal models use ``<|endoftext|>`` as the document separator (and padding); BERT uses
``[PAD] [UNK] [CLS] [SEP] [MASK]`` with ``[SEP]`` separating documents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..errors import UserError

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class SpecialIds:
    """Token ids the data pipeline and models need."""

    separator: int  # placed between documents in the token stream
    pad: int
    cls: int | None = None
    mask: int | None = None
    specials: tuple[int, ...] = ()  # never masked or predicted as MLM targets


def special_ids(tok: Tokenizer, family: str) -> SpecialIds:
    if family == "bert":
        ids = {t: tok.token_to_id(t) for t in BERT_SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"the tokenizer lacks BERT's special tokens {missing}: use a WordPiece tokenizer with "
                            "[PAD] [UNK] [CLS] [SEP] [MASK], or let apollo train one (omit --tokenizer)")
        return SpecialIds(separator=ids["[SEP]"], pad=ids["[PAD]"], cls=ids["[CLS]"], mask=ids["[MASK]"],
                          specials=tuple(sorted(ids.values())))
    eot = tok.token_to_id(EOT)
    if eot is None:
        # a foreign causal tokenizer: use its first added special token as separator if there is one
        added = [t for t in tok.get_added_tokens_decoder().values() if t.special]
        if not added:
            raise UserError(f"the tokenizer has no {EOT} or other special token to separate documents: add one, or "
                            "let apollo train a tokenizer (omit --tokenizer)")
        eot = tok.token_to_id(added[0].content)
    return SpecialIds(separator=eot, pad=eot, specials=(eot,))


def _batched(texts: Iterable[str], limit_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    used = 0
    for t in texts:
        if used >= limit_chars:
            break
        t = t[: limit_chars - used]
        used += len(t)
        batch.append(t)
        if len(batch) == 1000:
            yield batch
            batch = []
    if batch:
        yield batch


def _canonical_ids(vocab: dict[str, int]) -> dict[str, int]:
    """Renumber a trained WordPiece vocabulary in an order fixed by its tokens alone: the special tokens first,
    then by length without the ``##`` prefix, then alphabetically.

    The WordPiece trainer of ``tokenizers`` numbers the ``##`` continuation characters in the iteration order of a
    Rust hash map, which is seeded afresh for every training: the same text gives the same tokens under different
    ids from one run to the next (measured: 37 of 2,048 ids differed between two trainings on news.train), so two
    runs of one config tokenized their data differently and could not be compared or share caches. WordPiece
    encodes by greedy longest match, which does not depend on the ids, so renumbering keeps the tokenization and
    makes the ids reproducible."""
    specials = [t for t in BERT_SPECIALS if t in vocab]
    rest = sorted((t for t in vocab if t not in specials), key=lambda t: (len(t.removeprefix("##")), t))
    return {t: i for i, t in enumerate(specials + rest)}


def train_tokenizer(texts: Iterable[str], family: str, vocab_size: int, limit_chars: int = 200_000_000) -> Tokenizer:
    """Train a tokenizer of the kind the model family uses on (at most ``limit_chars`` of) the text."""
    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                            show_progress=False)
        tok.train_from_iterator(_batched(texts, limit_chars), trainer=trainer)
        tok.model = models.WordPiece(_canonical_ids(tok.get_vocab()), unk_token="[UNK]")
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_batched(texts, limit_chars), trainer=trainer)
    if tok.get_vocab_size() < 16:
        raise UserError("the training text is too small to train a tokenizer: give more text with --data")
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"no tokenizer at {path}: give a tokenizer.json file or a directory holding one")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(f"{p} is not a Hugging Face tokenizer.json ({e})") from None


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document without the post-processor's [CLS]/[SEP] (we place separators ourselves)."""
    encs = tok.encode_batch(docs, add_special_tokens=False)  # parallel in Rust
    return [e.ids for e in encs]
