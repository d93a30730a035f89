"""The benchmark corpora and their Parquet shards: deterministic synthetic texts, and real English text
taken offline from the long descriptions of the installed Python packages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.testing import synthetic_texts


def texts(n: int, seed: int) -> list[str]:
    """n texts with the realistic skewed length mix (mostly short, a tail to the model's max length)."""
    return synthetic_texts(n, seed=seed)


_FENCED = re.compile(r"```.*?```", re.S)
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) and ![alt](url) -> text
_URL = re.compile(r"<?https?://\S+>?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = ("#", "..", "|", "<", "!", "[!", "=", "+", ">>>", "$", "{", ":")  # headings, directives, tables, HTML


def prose(description: str) -> Iterable[str]:
    """The English prose paragraphs of a package description (Markdown or reStructuredText), each on one
    line, with links reduced to their text and URLs, inline-code marks and emphasis marks removed.

    Dropped: fenced and indented blocks (code, literal blocks, continuations), headings and their
    underlines, directives, tables, HTML, badges, and paragraphs under 6 words, under 85% letters and
    spaces, or not ending like a sentence (. ! ? : or a closing parenthesis).
    """
    for block in re.split(r"\n\s*\n", _FENCED.sub("\n\n", description)):
        lines = [line for line in block.split("\n") if line.strip() and not line.startswith((" ", "\t"))]
        if not lines or lines[0].lstrip().startswith(_NOT_PROSE):
            continue
        if any(set(line.strip()) <= set("=-~^*+#`'\"") for line in lines):  # a heading's underline
            continue
        text = re.sub(r"^[-*] ", "", " ".join(line.strip() for line in lines))
        text = re.sub(r"`+|\*\*|__", "", _URL.sub("", _LINK.sub(r"\1", text)))
        text = re.sub(r"\s+", " ", text).strip()
        if len(text.split()) < 6 or text[-1] not in ".!?:)":
            continue
        if sum(c.isalpha() or c.isspace() for c in text) < 0.85 * len(text):
            continue
        yield text


def real_texts() -> tuple[list[str], dict]:
    """Real English text, offline and deterministic for a given set of installed packages: every prose
    paragraph (`prose`) of every installed distribution's long description, plus each sentence of at
    least 4 words of those paragraphs, deduplicated and sorted.  Whole paragraphs give the long tail,
    single sentences the short rows.

    Returns (texts, info); info names the number of distributions and the corpus's sha256 (the texts
    joined by newlines), so runs in venvs with other packages can be told apart.
    """
    dists = {d.metadata["Name"].lower(): d for d in importlib.metadata.distributions() if d.metadata["Name"]}
    found: set[str] = set()
    for name in sorted(dists):
        meta = dists[name].metadata
        for paragraph in prose(meta.get_payload() or meta.get("Description") or ""):
            found.add(paragraph)
            found.update(s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= 4)
    texts = sorted(found)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    return texts, {"distributions": len(dists), "sha256": digest}


def short_rows(n: int, corpus: Sequence[str], max_chars: int = 48) -> list[str]:
    """n short texts for the overhead rows: the corpus cycled and cut to at most max_chars characters."""
    return [corpus[i % len(corpus)][:max_chars] for i in range(n)]


def length_summary(lengths: np.ndarray, max_length: int) -> dict:
    """Token-length statistics of the corpus, as the model sees it (after truncation to max_length)."""
    lengths = np.asarray(lengths)
    return {
        "rows": int(lengths.size),
        "tokens": int(lengths.sum()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "truncated_frac": float(np.mean(lengths >= max_length)),
    }


def write_shards(directory: str, texts: Sequence[str], shards: int) -> str:
    """Writes rows {id, text} as `shards` Parquet files; returns their glob."""
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):
        os.remove(os.path.join(directory, old))
    bounds = np.linspace(0, len(texts), shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"id": pa.array(np.arange(lo, hi), pa.int64()), "text": pa.array(list(texts[lo:hi]))})
        pq.write_table(table, os.path.join(directory, f"shard-{k:02d}.parquet"))
    return os.path.join(directory, "*.parquet")


def read_column(pattern_dir: str, column: str, *, prefix: str = "") -> tuple[np.ndarray, list]:
    """(ids, values of `column`) of every Parquet file in a directory whose name starts with prefix."""
    ids, values = [], []
    for name in sorted(os.listdir(pattern_dir)):
        if name.startswith(prefix) and name.endswith(".parquet"):
            table = pq.read_table(os.path.join(pattern_dir, name), columns=["id", column])
            ids.extend(table.column("id").to_pylist())
            values.extend(table.column(column).to_pylist())
    return np.asarray(ids), values


def parquet_rows(directory: str, *, prefix: str = "") -> int:
    """Rows in the Parquet files of a directory whose names start with prefix (metadata only)."""
    return sum(
        pq.ParquetFile(os.path.join(directory, name)).metadata.num_rows
        for name in os.listdir(directory)
        if name.startswith(prefix) and name.endswith(".parquet")
    )
