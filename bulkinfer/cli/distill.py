"""`bulkinfer distill`: teacher outputs for distillation, as training shards with a manifest."""

from __future__ import annotations

import argparse
import json

from bulkinfer.cli.args import _job_args
from bulkinfer.cli.jobs import _job_errors, _job_model, _job_spec, _keep_fields

EPILOG_DISTILL = """\
Any flag not listed above is a Beam pipeline option (see `bulkinfer run --help`).

Per row, keyed by --id-field: a classifier (an output --probs-field of softmax probabilities [C]) gives
top_k_indices int32 [K] (most probable first), top_k_logprobs float32 [K] = log_softmax(log(p) / T),
which equals log_softmax(logits / T), and rest_mass float32, the probability at T outside the top K
(rest_mass + sum(exp(top_k_logprobs)) = 1); an embedder (output --embedding-field) gives its embedding.
The model's other outputs and --keep-fields are kept.

Outputs in DIR:
  shards/shard-*.parquet | .array_record   the rows, in input order (ArrayRecord: one msgpack map per
                                           row; vectors as raw little-endian bytes)
  manifest.json       teacher name and digests, kind, top_k, temperature, schema, shards with rows,
                      bytes and sha256
  COMPLETED           written last; until it exists the shards are not final
  predictions/        the teacher run: dead letters (failed-*.jsonl), report.json
                      (rows_in = rows_out + rows_failed), committed units

An interrupted run resumes when the same command is run again; once COMPLETED, the same command does
nothing, and other settings or changed inputs are refused unless --overwrite.

Exit status: 0 done; 1 the job failed or is incomplete (rerun to resume); 2 bad flags or settings;
130 interrupted by Ctrl-C (committed units are kept; rerun to resume).

Examples:
  bulkinfer distill --model digits --input 'data/digits/test-*.jsonl' --output out/teacher --top-k 3 --temperature 2
  bulkinfer distill --model minilm --input 'data/sample/*.jsonl' --output out/emb --format array_record
"""


def _distill_parser(sub) -> argparse.ArgumentParser:
    distill = sub.add_parser(
        "distill", help="teacher outputs for distillation: top-k log-probs or embeddings as training shards",
        description="Run a teacher model over a dataset and write its outputs, keyed by id, as shards for a "
                    "training job (Parquet or ArrayRecord) with a manifest.",
        epilog=EPILOG_DISTILL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(distill, formats=("parquet", "array_record"))
    distill.add_argument("--keep-fields", default="", metavar="A,B",
                         help="input fields copied into the shards beside the id (e.g. the student's inputs or "
                              "labels; default: none)")
    distill.add_argument("--top-k", type=int, default=5, metavar="K",
                         help="classifiers: classes kept per row, most probable first (default: 5; at most C)")
    distill.add_argument("--temperature", type=float, default=1.0, metavar="T",
                         help="classifiers: log-probs are log_softmax(log(probs) / T) (default: 1)")
    distill.add_argument("--probs-field", default="probs", metavar="FIELD",
                         help="the teacher's softmax-probability output (default: probs)")
    distill.add_argument("--embedding-field", default="embedding", metavar="FIELD",
                         help="the teacher's embedding output, for embedders (default: embedding)")
    distill.add_argument("--rows-per-shard", type=int, default=100_000, metavar="N",
                         help="rows per shard at most; a unit of work with more gets several (default: 100000)")
    return distill


def _distill(args, beam_args) -> int:
    from bulkinfer.tasks import distill as job

    with _job_errors():
        spec = job.DistillSpec(top_k=args.top_k, temperature=args.temperature, format=args.format,
                               probs_field=args.probs_field, embedding_field=args.embedding_field,
                               rows_per_shard=args.rows_per_shard)
        teacher = _job_spec(argparse.Namespace(**{**vars(args), "format": "parquet"}), keep_fields=_keep_fields(args))
        manifest = job.distill(_job_model(args), teacher, spec, beam_args)
    summary = {k: manifest[k] for k in ("rows_in", "rows_out", "rows_failed", "kind", "top_k", "temperature",
                                        "format")}
    summary["shards"] = len(manifest["shards"])
    if manifest.get("already_completed"):
        summary["already_completed"] = True
    print(json.dumps(summary))
    return 0
