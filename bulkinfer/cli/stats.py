"""`bulkinfer stats`: statistics of a model's predictions over a dataset, and drift against a baseline."""

from __future__ import annotations

import argparse
import sys

from bulkinfer.cli.args import _job_args
from bulkinfer.cli.jobs import _job_errors, _job_model, _job_spec

EPILOG_STATS = """\
Runs the model over the input like `bulkinfer run` (into DIR/predictions, resumable, with dead letters),
then aggregates the predictions in one more Beam pipeline with mergeable sketches: no rows are collected
on one worker.  Any flag not listed above is a Beam pipeline option for both pipelines.

DIR/stats.json, overall and per --slice-field value:
  classifier (an output 'probs' [C]): predicted-class counts; confidence (top probability), margin
    (top1 - top2) and entropy (bits): mean, std, KLL quantiles 0.01 ... 0.99, 20-bin histogram
  embedder (an output 'embedding' [D]): L2 norm (mean, std, quantiles, histogram); per-dimension mean and
    variance; mean pairwise cosine on a sample of --sample-size rows chosen by a hash of their id
  drift (with --baseline): Jensen-Shannon distance (base 2, 0..1) per distribution against the baseline
  sketch: the KLL sketch's k and normalized rank error.  Counts, histograms, means and variances are
    exact and identical for any sharding; quantiles are within the stated rank error.
DIR/report.html (+ PNGs): class distribution, confidence histogram, norm histogram, drift.

Exit status: 0 done; 1 a pipeline failed, the predictions are incomplete (rerun to resume) or no row was
predicted; 2 bad flags or settings; 130 interrupted by Ctrl-C (committed units are kept; rerun to resume).

Examples:
  bulkinfer stats --model digits --input 'data/digits/test-*.jsonl' --output out/digits-stats
  bulkinfer stats --model minilm --input 'texts/*.jsonl' --output out/minilm-stats --slice-field lang
  bulkinfer stats --model digits --input 'new/*.jsonl' --output out/new --baseline out/digits-stats
"""


def _stats_parser(sub) -> argparse.ArgumentParser:
    stats = sub.add_parser(
        "stats", help="statistics of a model's predictions over a dataset, and drift against a baseline",
        description="Run a model over a dataset and summarize its predictions with mergeable sketches.",
        epilog=EPILOG_STATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(stats)
    stats.add_argument("--slice-field", action="append", default=[], metavar="FIELD",
                       help="also compute the statistics per value of this input field (repeat for more fields)")
    stats.add_argument("--baseline", metavar="DIR", default=None,
                       help="an earlier stats run's output directory: adds the drift against it to stats.json")
    stats.add_argument("--probs-field", default=None, metavar="NAME",
                       help="the model's softmax-probabilities output (default: probs, if the model has it)")
    stats.add_argument("--embedding-field", default=None, metavar="NAME",
                       help="the model's embedding output (default: embedding, if the model has it)")
    stats.add_argument("--sample-size", type=int, default=1000, metavar="N",
                       help="rows sampled (by id hash) for the mean pairwise cosine of embeddings (default: 1000)")
    stats.add_argument("--sketch-k", type=int, default=200, metavar="K",
                       help="the KLL quantile sketch's k: 200 gives ~1.3%% rank error (default: 200)")
    return stats


def _stats(args, beam_args) -> int:
    from bulkinfer.tasks import stats as job

    with _job_errors("bulkinfer stats"):
        spec = job.StatsSpec(slice_fields=tuple(args.slice_field), baseline=args.baseline,
                             probs_field=args.probs_field, embedding_field=args.embedding_field,
                             sample_size=args.sample_size, sketch_k=args.sketch_k)
        result = job.stats(_job_model(args), _job_spec(args), spec, beam_args)
    for line in job.summary(result):
        print(line)
    out = args.output.rstrip("/")
    print(f"wrote {out}/{job.STATS_FILE} and {out}/report.html")
    if result["rows_out"] == 0:
        print(f"bulkinfer stats: error: no prediction rows to summarize: all {result['rows_in']} input rows failed "
              f"(see {out}/predictions/failed-*.jsonl)", file=sys.stderr)
        return 1
    return 0
