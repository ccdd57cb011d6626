"""Readers: turn the user's files into a stream of documents (strings).

Formats, chosen by file name: ``.txt``/``.text``/``.md`` (documents separated by blank lines, or one per file),
``.jsonl``/``.ndjson``/``.json`` (one JSON object per line, text in ``text_field``), ``.parquet`` (a string
column ``text_field``); each optionally compressed as ``.gz``, ``.xz``, ``.bz2`` or ``.zst``. Arguments may be
files, globs or directories (searched recursively for supported files), or ``hf:NAME[:CONFIG][@SPLIT]`` for a
Hugging Face dataset (needs the ``datasets`` package and a network connection, or a local cache).

Text is decoded as UTF-8; bytes that are not valid UTF-8 are replaced with U+FFFD (so a stray binary file
does not stop a run), and a file that is mostly replacement characters is refused as not being text.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
_BLANK_LINE = re.compile(r"\n\s*\n")


def split_compression(path: str) -> tuple[str, str]:
    """('a.jsonl.xz') -> ('a.jsonl', '.xz')."""
    for c in COMPRESSIONS:
        if path.endswith(c):
            return path[: -len(c)], c
    return path, ""


def file_format(path: str) -> str | None:
    base, _ = split_compression(path.lower())
    if base.endswith(TEXT_SUFFIXES):
        return "txt"
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_sources(patterns: list[str]) -> list[str]:
    """Expand globs and directories into a sorted list of supported files; hf: names pass through."""
    out: list[str] = []
    for pat in patterns:
        if pat.startswith("hf:"):
            out.append(pat)
            continue
        if any(ch in pat for ch in "*?["):
            matches = sorted(glob.glob(pat, recursive=True))
            if not matches:
                raise UserError(f"no files match {pat!r}: check the pattern (quote it so the shell does not "
                                "expand it) and the working directory")
        elif os.path.isdir(pat):
            matches = sorted(str(p) for p in Path(pat).rglob("*") if p.is_file() and file_format(str(p)))
            if not matches:
                raise UserError(f"directory {pat} holds no .txt, .jsonl or .parquet files (optionally .gz/.xz/"
                                ".bz2/.zst): point --data at the files")
        elif os.path.exists(pat):
            matches = [pat]
        else:
            raise UserError(f"data file {pat} does not exist: check the path")
        for m in matches:
            if os.path.isdir(m):
                continue
            if file_format(m) is None:
                raise UserError(f"{m}: unsupported file type; use .txt, .jsonl or .parquet (optionally "
                                ".gz/.xz/.bz2/.zst)")
            if m not in out:
                out.append(m)
    return out


def _open_binary(path: str) -> io.BufferedIOBase:
    _, comp = split_compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".zst":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # type: ignore
    return open(path, "rb")


def _read_text(path: str) -> str:
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except (EOFError, lzma.LZMAError, OSError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot be read ({e}); the file may be truncated or not of the type its name "
                        "says: re-create or re-download it") from None
    except Exception as e:  # zstandard raises its own error type
        raise UserError(f"{path}: cannot be decompressed ({e}); re-create or re-download it") from None
    text = raw.decode("utf-8", errors="replace")
    if text and text.count("\ufffd") > 0.1 * len(text):
        raise UserError(f"{path}: does not look like UTF-8 text (over 10 % undecodable bytes): remove it from "
                        "--data or convert it to UTF-8")
    return text


def record_lines(text: str) -> list[str]:
    """The lines of a line-per-record file (JSON Lines, TSV): split at "\n" only. str.splitlines() also breaks at
    U+0085, U+2028 and U+2029, which JSON leaves unescaped inside strings (real Wikipedia text has them)."""
    return text.split("\n")


def _iter_file(path: str, text_field: str, txt_docs: str) -> Iterator[str]:
    fmt = file_format(path)
    if fmt == "txt":
        text = _read_text(path)
        if txt_docs == "file":
            if text.strip():
                yield text.strip()
        else:
            for para in _BLANK_LINE.split(text):
                if para.strip():
                    yield para.strip()
    elif fmt == "jsonl":
        text = _read_text(path)
        for lineno, line in enumerate(record_lines(text), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise UserError(f"{path}:{lineno}: no {text_field!r} field; give the field holding the text with "
                                "--text-field")
            value = obj[text_field]
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} is not a string")
            if value.strip():
                yield value
    elif fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            with _open_binary(path) as f:
                table = pq.read_table(io.BytesIO(f.read()), columns=[text_field])
        except KeyError:
            raise UserError(f"{path}: no column {text_field!r}; give the text column with --text-field") from None
        except Exception as e:
            if "No match for FieldRef" in str(e) or text_field in str(e):
                raise UserError(f"{path}: no column {text_field!r}; give the text column with --text-field") \
                    from None
            raise UserError(f"{path}: cannot be read as Parquet ({e})") from None
        for value in table.column(text_field).to_pylist():
            if isinstance(value, str) and value.strip():
                yield value


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    """hf:NAME[:CONFIG][@SPLIT] through the `datasets` library (streaming, so nothing is stored twice)."""
    try:
        import datasets  # type: ignore
    except ImportError:
        raise UserError(f"{spec}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'apollo-lm[hf]'") from None
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"{spec}: could not load the dataset ({e}); check the name and that the machine is "
                        "online or has it cached") from None
    for row in ds:
        value = row.get(text_field)
        if value is None:
            raise UserError(f"{spec}: no {text_field!r} field; give the text field with --text-field")
        if isinstance(value, str) and value.strip():
            yield value


def iter_documents(sources: list[str], text_field: str = "text", txt_docs: str = "blank-line") -> Iterator[str]:
    """Every document of every source, in order."""
    for src in sources:
        if src.startswith("hf:"):
            yield from _iter_hf(src, text_field)
        else:
            yield from _iter_file(src, text_field, txt_docs)


def default_corpus() -> list[str]:
    """English prose that ships with Python itself (the pydoc topic help texts): needs no download."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        for para in _BLANK_LINE.split(topics[key]):
            if para.strip():
                docs.append(para.strip())
    return docs


def source_fingerprint(sources: list[str]) -> list[list]:
    """What identifies the input for caching: path, size and modification time of each file."""
    out: list[list] = []
    for s in sources:
        if s.startswith("hf:"):
            out.append([s])
        else:
            st = os.stat(s)
            out.append([os.path.abspath(s), st.st_size, st.st_mtime_ns])
    return out
