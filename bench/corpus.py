"""The benchmark corpus: deterministic synthetic texts, their token lengths, and Parquet shards of them."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.testing import synthetic_texts


def texts(n: int, seed: int) -> list[str]:
    """n texts with the realistic skewed length mix (mostly short, a tail to the model's max length)."""
    return synthetic_texts(n, seed=seed)


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
