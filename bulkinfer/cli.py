"""`bulkinfer`: the command line.  It parses arguments and calls one library function per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

EPILOG_RUN = """\
Any flag not listed above is a Beam pipeline option, passed through unchanged, e.g.
  --runner=PortableRunner --job_endpoint=localhost:8099 --environment_type=EXTERNAL ...
  --direct_num_workers=2 --direct_running_mode=multi_processing
Without --runner the job runs on Beam's embedded FnApiRunner in this process.

Rerunning the same command after an interruption resumes: input files already committed
(DIR/_committed/) are skipped.

Outputs in DIR:
  part-*.parquet (or .jsonl)  one row per input row that succeeded: the id field and the embedding
  failed-*.jsonl              one row per input row that failed: id, stage, error, raw record
  report.json                 rows_in = rows_out + rows_failed, rows/s, padding, compiles, ...

Example:
  bulkinfer run --model minilm --input 'data/sample/*.jsonl' --output out/demo
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulkinfer", description="Bulk (offline) ML inference on Apache Beam.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="embed a dataset: files in, predictions out",
        description="Run a model over every row of a dataset and write the predictions.",
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True,
                     help="a built-in model name (minilm) or a sentence-transformers/HF BERT directory")
    run.add_argument("--input", required=True, metavar="GLOB",
                     help="input files: .jsonl, .parquet or .csv, on any Beam filesystem (quote the glob)")
    run.add_argument("--output", required=True, metavar="DIR", help="output directory")
    run.add_argument("--id-field", default="id", help="row field copied to the output as the row's id (default: id)")
    run.add_argument("--text-field", default="text", help="row field holding the text to embed (default: text)")
    run.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="output format (default: parquet)")
    run.add_argument("--overwrite", action="store_true", help="start from scratch: delete an earlier run's outputs in DIR (default: resume it)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    run.add_argument("--max-length", type=int, default=None,
                     help="truncate texts to this many tokens (default: the model's max_seq_length)")
    run.add_argument("--token-budget", type=int, default=None,
                     help="tokens per device batch, rows x padded length (default: 2048)")
    run.add_argument("--warmup", action="store_true", help="compile every batch shape before reading data")
    run.add_argument("--compilation-cache", metavar="DIR", default=None,
                     help="persistent XLA compilation cache directory, shared across runs")
    run.add_argument("-v", "--verbose", action="store_true", help="log Beam's and bulkinfer's progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, beam_args = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Beam warns on import about optional Google Cloud clients that local jobs never use.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
    if args.command == "run":
        return _run(args, beam_args)
    return 2


def _run(args, beam_args) -> int:
    import dataclasses

    from bulkinfer import job
    from bulkinfer.models import CheckpointError
    from bulkinfer.runtime import Bucketing
    from bulkinfer.tasks.embed import TextEmbedder

    try:
        bucketing = Bucketing()
        if args.token_budget:
            bucketing = dataclasses.replace(bucketing, token_budget=args.token_budget)
        model = TextEmbedder.from_name(
            args.model, dtype=args.dtype, max_length=args.max_length, bucketing=bucketing,
            warmup=args.warmup, compilation_cache_dir=args.compilation_cache)
        spec = job.JobSpec(input=args.input, output=args.output, format=args.format, id_field=args.id_field,
                           input_field=args.text_field, overwrite=args.overwrite)
        report = job.run(model, spec, beam_args)
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_per_s", "elapsed_s")}))
    if not report["reconciled"] or report["files_done"] != report["files"]:
        print("bulkinfer: error: rows_in != rows_out + rows_failed; see report.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
