"""Data: readers for every format, tokenizer training and loading, cached token files, batches, masking."""

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from apollo_lm.config import RunConfig
from apollo_lm.data import tokens as tokens_mod
from apollo_lm.data.batches import IGNORE, Batcher
from apollo_lm.data.readers import expand_sources, iter_documents
from apollo_lm.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer
from apollo_lm.data.tokens import prepare_corpus
from apollo_lm.errors import UserError


def test_readers_all_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz doc"}\n\n{"text": "gz two"}\n'))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(b'{"text": "xz doc"}\n'))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "zst doc"}\n'))
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), tmp_path / "e.parquet")
    files = expand_sources([str(tmp_path)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.jsonl.gz", "c.jsonl.xz", "d.jsonl.zst", "e.parquet"]
    docs = list(iter_documents([str(tmp_path / "a.txt"), *files[1:3], files[4]]))
    assert docs == ["first para\nline two", "second para", "gz doc", "gz two", "xz doc", "pq one", "pq two"]
    assert list(iter_documents([str(tmp_path / "a.txt")], txt_docs="file")) == [
        "first para\nline two\n\n\nsecond para"]
    assert list(iter_documents([files[3]], text_field="body")) == ["zst doc"]
    assert expand_sources([str(tmp_path / "*.jsonl.*")]) == files[1:4]


def test_jsonl_records_end_at_newline_only(tmp_path):
    # JSON leaves U+0085, U+2028 and U+2029 unescaped inside strings (English Wikipedia has them); a reader that
    # split at every Unicode line boundary broke such a record in two and refused the file
    docs = ["a\u0085b", "c\u2028d\u2029e", "f\x1cg\x0bh\x0ci"]
    body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs) + '{"text": "crlf"}\r\n'
    (tmp_path / "u.jsonl").write_bytes(body.encode())
    assert list(iter_documents([str(tmp_path / "u.jsonl")])) == [*docs, "crlf"]


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        expand_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="no files match"):
        expand_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        expand_sources([str(tmp_path / "x.csv")])
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: no 'text' field"):
        list(iter_documents([str(tmp_path / "m.jsonl")]))
    (tmp_path / "t.jsonl.xz").write_bytes(lzma.compress(b'{"text": "abc"}\n' * 1000)[:60])
    with pytest.raises(UserError, match="truncated"):
        list(iter_documents([str(tmp_path / "t.jsonl.xz")]))
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)) * 50)
    with pytest.raises(UserError, match="UTF-8"):
        list(iter_documents([str(tmp_path / "bin.txt")]))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_tokenizer_train_save_load(tmp_path, docs, family):
    tok = train_tokenizer(docs[:800], family, vocab_size=400)
    assert tok.get_vocab_size() <= 400
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    text = "The for statement is used to iterate over the elements of a sequence."
    assert again.encode(text).ids == tok.encode(text).ids
    ids = special_ids(again, family)
    if family == "gpt":
        assert tok.decode(tok.encode(text).ids) == text  # byte-level BPE is lossless
        assert ids.separator == ids.pad == tok.token_to_id("<|endoftext|>")
    else:
        assert ids.mask == tok.token_to_id("[MASK]") and ids.cls == tok.token_to_id("[CLS]")
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_tokenizer_training_is_reproducible(docs, family):
    """The same text gives the same tokenizer, ids included, every time it is trained (the WordPiece trainer alone
    numbers its continuation characters in a hash map's random order: we renumber them canonically)."""
    vocabs = [train_tokenizer(docs[:800], family, vocab_size=400).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs[1:])
    if family == "bert":
        assert [vocabs[0][t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]


def _cfg(train, valid=None, **kw):
    base = dict(data=[str(train)], valid=[str(valid)] if valid else [], vocab_size=300, seq_len=32)
    base.update(kw)
    return RunConfig(**base).resolved()


def test_token_files_are_cached_and_typed(corpus_files, monkeypatch):
    train, valid = corpus_files
    cfg = _cfg(train, valid)
    c1 = prepare_corpus(cfg)
    assert c1.train.tokens.dtype == np.uint16 and len(c1.train.tokens) > 10_000
    assert c1.train.tokens[-1] == c1.ids.separator  # every document ends with the separator
    assert c1.train.n_docs == 1500 and c1.valid.n_bytes > 0

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokens_mod, "_write_tokens", boom)
    monkeypatch.setattr(tokens_mod, "train_tokenizer", boom)
    c2 = prepare_corpus(cfg)
    assert c2.cache_key == c1.cache_key
    np.testing.assert_array_equal(np.asarray(c2.train.tokens), np.asarray(c1.train.tokens))


def test_held_out_documents(corpus_files):
    train, _ = corpus_files
    c = prepare_corpus(_cfg(train, valid_fraction=0.1))
    assert c.valid.n_docs == 150 and c.train.n_docs == 1350  # whole documents, evenly spaced
    with pytest.raises(UserError, match="--valid-fraction"):
        prepare_corpus(_cfg(train, valid_fraction=0.0005))


def test_empty_and_tiny_corpora(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="too small|no training text"):
        prepare_corpus(_cfg(empty))
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(["a short paragraph of text"] * 40))
    with pytest.raises(UserError, match="too few for even one batch"):
        prepare_corpus(_cfg(small, seq_len=512, valid_fraction=0.5))


def _batcher(family, docs, **kw):
    tok = train_tokenizer(docs[:600], family, vocab_size=300)
    ids = special_ids(tok, family)
    stream = np.concatenate([np.asarray(e.ids + [ids.separator]) for e in tok.encode_batch(
        docs[:600], add_special_tokens=False)]).astype(np.uint16)
    return Batcher(stream, family, seq_len=64, batch_size=8, ids=ids, vocab_size=tok.get_vocab_size(), seed=7,
                   **kw), ids


def test_causal_batches_are_deterministic_per_step(docs):
    b, _ = _batcher("gpt", docs)
    x1, y1 = b.get(5).x, b.get(5).y
    assert torch.equal(x1, b.get(5).x) and not torch.equal(x1, b.get(6).x)
    assert not torch.equal(x1, b.get(5, micro=1).x)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    v1, v2 = b.fixed_batches(3), b.fixed_batches(3)
    assert all(torch.equal(a.x, c.x) for a, c in zip(v1, v2))


def test_masking_statistics(docs):
    b, ids = _batcher("bert", docs)
    b.B = 256
    batch = b.get(0)
    x, y = batch.x.numpy(), batch.y.numpy()
    assert (x[:, 0] == ids.cls).all() and (y[:, 0] == IGNORE).all()
    chosen = y != IGNORE
    special = np.isin(y[chosen], ids.specials)
    assert not special.any()  # special tokens are never targets
    n = chosen.sum()
    eligible = (~np.isin(np.where(chosen, y, x), ids.specials)).sum()
    assert abs(n / eligible - 0.15) < 0.01
    masked = (x[chosen] == ids.mask).mean()
    unchanged = (x[chosen] == y[chosen]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
    assert torch.equal(b.get(3).x, b.get(3).x)  # masking is seeded by the step


SHARED_EN = Path(__file__).resolve().parents[2] / "shared" / "data" / "en"


@pytest.mark.skipif(not (SHARED_EN / "wiki.train.jsonl.xz").exists(), reason="the shared benchmark corpus is absent")
def test_benchmark_corpus_reads_whole():
    # the corpus of bench/growth.py's GPU sizes, read by the product's reader; the counts are the data README's
    counts = {"wiki.train": 6394, "wiki.valid": 299, "news.train": 17186, "news.valid": 420}
    for name, n in counts.items():
        assert sum(1 for _ in iter_documents([str(SHARED_EN / f"{name}.jsonl.xz")])) == n, name
