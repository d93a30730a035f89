"""Training shards: whole files of rows for a training job to read, Parquet or ArrayRecord, each with
its row count, size and sha256, written under a temporary name and renamed when complete.

    with ShardWriter("out/shards/shard-0.array_record", "array_record") as w:
        w.write(record_batch)                        # pa.RecordBatch or pa.Table, as many as you like
    w.info                                           # {"path", "rows", "bytes", "sha256"}
    rows = [decode_record(r, schema) for r in ArrayRecordReader(path).read_all()]

Formats:
  parquet       one Arrow table; vectors as fixed-size lists (`pyarrow.parquet.read_table`).
  array_record  one record per row (the `array-record` package; Grain's `ArrayRecordDataSource` reads
                it), written with the options `group_size:1` for random access.  A record is a msgpack
                map from field name to value (`RECORD_ENCODING`): a field with a fixed shape (a vector,
                `shape` non-empty in `schema_of`) holds its values' raw little-endian bytes, row-major
                (`np.frombuffer(v, dtype).reshape(shape)`); every other field its plain msgpack value
                (int, float, str, bool, None, list).  Decoding needs msgpack and numpy only, no bulkinfer.

A shard is written to a local temporary file first (the ArrayRecord writer takes local paths only),
hashed, then copied to its directory on any Beam filesystem under a hidden name and renamed.
The bytes depend only on the rows, so writing the same rows again (a retried bundle) gives the same file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam.writers import commit, temp_name

SHARD_FORMATS = ("parquet", "array_record")
EXTENSIONS = {"parquet": "parquet", "array_record": "array_record"}
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: random access without decoding neighbours
RECORD_ENCODING = ("msgpack map per row: field -> value; fields with a non-empty shape hold raw little-endian "
                   "bytes, row-major (numpy: np.frombuffer(value, dtype).reshape(shape)); other fields plain "
                   "msgpack values")
_COPY_CHUNK = 8 << 20


def _dtype_name(t: pa.DataType) -> str:
    names = {"float": "float32", "double": "float64", "halffloat": "float16", "large_string": "string",
             "large_binary": "binary"}
    return names.get(str(t), str(t))


def field_layout(t: pa.DataType) -> tuple[pa.DataType, list[int | None]]:
    """(value type, per-row shape) of an Arrow column type: fixed-size lists (nested) give their sizes,
    a variable-length list None, anything else the empty shape."""
    shape: list[int | None] = []
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        shape.append(t.list_size if pa.types.is_fixed_size_list(t) else None)
        t = t.value_type
    return t, shape


def _is_vector(t: pa.DataType) -> bool:
    value, shape = field_layout(t)
    return bool(shape) and None not in shape and (pa.types.is_integer(value) or pa.types.is_floating(value))


def schema_of(schema: pa.Schema) -> list[dict]:
    """The manifest's schema: [{"name", "dtype", "shape"}] per field, e.g. {"name": "top_k_logprobs",
    "dtype": "float32", "shape": [5]}; `shape` [] is a scalar, a None entry a variable length."""
    fields = []
    for f in schema:
        value, shape = field_layout(f.type)
        fields.append({"name": f.name, "dtype": _dtype_name(value), "shape": shape})
    return fields


def encode_records(batch: pa.RecordBatch | pa.Table) -> list[bytes]:
    """One msgpack record per row (see the module docstring); vectors go through numpy, not Python floats."""
    import msgpack

    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    n = table.num_rows
    columns: dict[str, list] = {}
    for name, column in zip(table.column_names, table.columns):
        if _is_vector(column.type) and not column.null_count:
            _, shape = field_layout(column.type)
            flat = column.combine_chunks()
            for _ in shape:
                flat = flat.flatten()
            values = flat.to_numpy(zero_copy_only=False)
            matrix = values.astype(values.dtype.newbyteorder("<"), copy=False).reshape(n, -1)  # [N, prod(shape)]
            columns[name] = [row.tobytes() for row in matrix]
        else:
            columns[name] = column.to_pylist()
    names = list(columns)
    return [msgpack.packb({k: columns[k][i] for k in names}, use_bin_type=True) for i in range(n)]


def decode_record(record: bytes, schema: list[dict]) -> dict:
    """A record back as a dict, vectors as numpy arrays of their dtype and shape (`schema` from the manifest).

    The same thing without bulkinfer:

        row = msgpack.unpackb(record)
        top = np.frombuffer(row["top_k_logprobs"], "<f4")        # shape [k]
    """
    import msgpack

    row = msgpack.unpackb(record, raw=False)
    for f in schema:
        value = row.get(f["name"])
        if f["shape"] and None not in f["shape"] and isinstance(value, bytes):
            row[f["name"]] = np.frombuffer(value, np.dtype(f["dtype"]).newbyteorder("<")).reshape(f["shape"])
    return row


class ShardWriter:
    """Writes one shard (`final` on any Beam filesystem) from record batches; `info` after closing.

    All batches must share one schema (cast them first).  Raises ValueError for an unknown format.
    """

    def __init__(self, final: str, fmt: str, schema: pa.Schema):
        if fmt not in SHARD_FORMATS:
            raise ValueError(f"unknown shard format {fmt!r}; expected one of {SHARD_FORMATS}")
        self._final, self._fmt, self._schema = final, fmt, schema
        self._dir = tempfile.mkdtemp(prefix="bulkinfer-shard-")
        self._local = os.path.join(self._dir, "shard")
        self.rows = 0
        self.info: dict | None = None
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._local, schema)
        else:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._writer = ArrayRecordWriter(self._local, ARRAY_RECORD_OPTIONS)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self._writer.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        if self._fmt == "parquet":
            self._writer.write_table(batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch]))
        else:
            for record in encode_records(batch):
                self._writer.write(record)
        self.rows += batch.num_rows

    def close(self) -> dict:
        """Finishes the local file, copies it under the final name (via a hidden temporary) and returns
        {"path": final, "rows", "bytes", "sha256"}."""
        self._writer.close()
        h, size = hashlib.sha256(), 0
        temp = temp_name(self._final) + f"-{uuid.uuid4().hex[:8]}"  # concurrent attempts never share one
        try:
            with open(self._local, "rb") as src, FileSystems.create(temp) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            commit(temp, self._final)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        self.info = {"path": self._final, "rows": self.rows, "bytes": size, "sha256": h.hexdigest()}
        return self.info


def file_sha256(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file on any Beam filesystem."""
    h, size = hashlib.sha256(), 0
    with FileSystems.open(path) as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
