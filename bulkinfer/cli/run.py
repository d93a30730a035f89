"""`bulkinfer run`: a model over a dataset, files in, predictions out."""

from __future__ import annotations

import argparse
import json

from bulkinfer.cli.args import _job_args
from bulkinfer.cli.jobs import _exit_status, _job_errors, _job_model, _job_spec, _keep_fields

EPILOG_RUN = """\
Any flag not listed above is a Beam pipeline option, passed through unchanged, e.g.
  --runner=PortableRunner --job_endpoint=localhost:8099 --environment_type=EXTERNAL ...
  --direct_num_workers=2 --direct_running_mode=multi_processing
Without --runner the job runs on Beam's embedded FnApiRunner in this process.

Units of work: each input file, or for files over --unit-size (JSONL byte ranges cut at newlines,
Parquet row groups; CSV is never split) a range of one.  A unit is committed (DIR/_committed/) only
when its rows_in = rows_out + rows_failed; otherwise the job fails and nothing of it is committed.
Units run in waves of --wave-units, one Beam pipeline each.

Rerunning the same command after an interruption resumes: committed units are skipped, units whose
input file changed since (size or modification time) are redone with their old outputs replaced,
and report.json counts units_skipped, units_resumed and units_reprocessed.

Bad rows vs outages: a row that cannot be read, lacks its input or id (or has the wrong type, shape or
dtype), or on which the model fails
(isolated by bisection) is a dead letter in failed-*.jsonl.  A server down past --server-retry-budget-s
or a failed device is not the rows' fault: the job stops with exit 1, those rows are not committed,
and rerunning the same command later does them.  The job also stops with exit 1 when more than
--max-failed-fraction of its rows fail (checked once 1000 rows were seen, or when all of at least 100
rows failed): a systemic fault.

Exit status: 0 done; 1 the job failed or is incomplete (rerun to resume); 2 bad flags or settings;
130 interrupted by Ctrl-C (committed units are kept; rerun to resume).

Outputs in DIR:
  part-*.parquet (or .jsonl)  one row per input row that succeeded: the id field, --keep-fields and the
                              model's outputs (embedding; label and probs for digits)
  failed-*.jsonl              one row per input row that failed: id, stage, error, raw record
  report.json                 rows_in = rows_out + rows_failed, rows/s, padding, compiles, ...

Examples:
  bulkinfer run --model minilm --input 'data/sample/*.jsonl' --output out/demo
  bulkinfer run --model minilm --server http://127.0.0.1:8000 --input 'data/sample/*.jsonl' --output out/remote
  bulkinfer run --model digits --input 'data/digits/*.jsonl' --output out/digits
      (its rows' own "label" would clash with the model's output of that name: `bulkinfer eval` compares them)
"""


def _run_parser(sub) -> argparse.ArgumentParser:
    run = sub.add_parser(
        "run", help="run a model over a dataset: files in, predictions out",
        description="Run a model over every row of a dataset and write the predictions.",
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(run)
    run.add_argument("--keep-fields", default="", metavar="A,B",
                     help="input fields copied to the output beside the id and the predictions, e.g. labels "
                          "for evaluation or metadata for joins (default: none)")
    return run


def _run(args, beam_args) -> int:
    from bulkinfer.tasks import run as job

    with _job_errors():
        report = job.run(_job_model(args), _job_spec(args, keep_fields=_keep_fields(args)), beam_args)
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_per_s", "elapsed_s")}))
    return _exit_status(report, args.output)
