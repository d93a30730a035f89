"""`bulkinfer eval`: evaluate a classifier (or an embedder, zero-shot) on labelled data."""

from __future__ import annotations

import argparse
import sys

from bulkinfer.cli.args import _job_args
from bulkinfer.cli.jobs import _job_errors, _job_model, _job_spec

EPILOG_EVAL = """\
Runs the model over the input as `bulkinfer run` does, into DIR/predictions/ (resumable: rerun the same
command after an interruption), keeping --label-field and --slice-field, then evaluates the predictions
in one more Beam pipeline whose combiners give the same numbers for any sharding or worker count.
Any flag not listed above is a Beam pipeline option for both pipelines (see bulkinfer run --help).

A classifier has a probabilities output (--probs-field, default probs: softmax over C classes; the true
class is an integer 0..C-1, or a name from --class-names).  An embedder (output --embedding-field, e.g.
minilm) is evaluated as a zero-shot classifier: --class-names are embedded by the same model and
probs = softmax(20 * cosine(text, class name)), the scale of sentence-transformers'
MultipleNegativesRankingLoss.  A label field named like a model output (digits' "label") is kept in
DIR/predictions/ as true_<name>.

Metrics (scikit-learn's definitions): accuracy; macro_f1 = f1_score(average="macro", zero_division=0);
log_loss = log_loss(labels=range(C)) (probabilities clipped to [eps, 1-eps], float32 eps); brier =
brier_score_loss(labels=range(C), scale_by_half=False), the mean of sum_c (p_c - onehot_c)^2; ece over 15
equal-width bins of the top-label confidence (Guo et al. 2017); confusion_matrix (rows = true class);
per_class precision, recall, f1, support.

--bootstrap N: a percentile interval for accuracy, macro_f1, log_loss, brier and ece from N Poisson(1)
bootstrap replicates whose weights derive from a hash of (--seed, row id, replicate), in the same pass:
identical across shardings and reruns.

--baseline DIR gates against an earlier eval's DIR/metrics.json.  A metric where higher is better
(accuracy, macro_f1) fails when the upper end of its interval (the value itself without --bootstrap) is
below baseline - --max-drop; one where lower is better (log_loss, brier, ece) fails when the lower end is
above baseline + --max-drop.  The comparison goes into metrics.json under "baseline".

Exit status: 0 done (gate passed); 1 the job failed or is incomplete (rerun to resume), or no row could be
evaluated; 2 bad flags or settings; 3 the baseline gate failed (everything was still written); 130
interrupted by Ctrl-C (committed units are kept; rerun to resume).

Outputs in DIR:
  metrics.json               rows_in, rows_out, rows_failed (prediction), rows_evaluated, rows_failed_eval,
                             accuracy, macro_f1, log_loss, brier, ece, confusion_matrix, per_class,
                             calibration, bootstrap, slices, baseline
  report.html (+ *.png)      confusion matrix, reliability diagram, confidence histogram, per-class bars;
                             self-contained (inline images), readable offline
  failed-eval-*.jsonl        prediction rows that could not be evaluated (label or probabilities unusable)
  predictions/               the prediction run's output (part-*, failed-*, report.json)

Examples:
  bulkinfer eval --model digits --input 'data/digits/test-*.jsonl' --label-field label --output out/eval
  bulkinfer eval --model digits --input 'data/digits/test-*.jsonl' --output out/eval2 --bootstrap 1000 \
      --seed 0 --baseline out/eval --max-drop 0.01
  bulkinfer eval --model minilm --input 'reviews/*.jsonl' --label-field topic --class-names sports,politics \
      --output out/zero-shot
"""


def _eval_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser(
        "eval", help="evaluate a classifier (or an embedder, zero-shot) on labelled data",
        description="Evaluate a model on labelled data: metrics.json, report.html and the predictions.",
        epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(ev)
    ev.add_argument("--label-field", default="label", metavar="FIELD",
                    help="row field holding the true class: an integer 0..C-1, or a --class-names name (default: label)")
    ev.add_argument("--slice-field", action="append", default=[], metavar="FIELD",
                    help="also compute every metric per value of this field; repeat for several fields")
    ev.add_argument("--probs-field", default="probs", metavar="FIELD",
                    help="the model's probabilities output, C numbers summing to 1 (default: probs)")
    ev.add_argument("--embedding-field", default="embedding", metavar="FIELD",
                    help="an embedder's output, classified zero-shot by --class-names (default: embedding)")
    ev.add_argument("--class-names", default=None, metavar="A,B,C",
                    help="the classes' names in index order: needed for an embedder (zero-shot); for a classifier "
                         "they label the report and let labels be names")
    ev.add_argument("--bootstrap", type=int, default=0, metavar="N",
                    help="Poisson-bootstrap replicates for the headline metrics' intervals (default: 0, none; "
                         "e.g. 1000)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap weights (default: 0)")
    ev.add_argument("--interval", default="2.5,97.5", metavar="LO,HI",
                    help="the interval's percentiles (default: 2.5,97.5)")
    ev.add_argument("--baseline", default=None, metavar="DIR",
                    help="an earlier eval's output directory to gate against (exit 3 when a metric drops)")
    ev.add_argument("--max-drop", type=float, default=0.0, metavar="X",
                    help="how far a metric may fall behind --baseline beyond its interval, in the metric's own "
                         "units (default: 0)")
    return ev


def _eval(args, beam_args) -> int:
    from bulkinfer.tasks import evaluate as ev

    with _job_errors("bulkinfer eval", failed=(ev.NothingEvaluated,)):
        try:
            try:
                lo, hi = (float(x) for x in args.interval.split(","))
            except ValueError:
                raise ValueError(f"--interval {args.interval!r}: write two percentiles, e.g. 2.5,97.5") from None
            names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else None
            spec = ev.EvalSpec(label_field=args.label_field, slice_fields=tuple(args.slice_field),
                               probs_field=args.probs_field, embedding_field=args.embedding_field,
                               class_names=names, bootstrap=args.bootstrap, seed=args.seed, percentiles=(lo, hi),
                               baseline=args.baseline, max_drop=args.max_drop)
            metrics = ev.evaluate(_job_model(args), _job_spec(args), spec, beam_args)
        except ev.GateFailed as e:
            print(ev.summary(e.metrics))
            print(f"bulkinfer eval: {e}", file=sys.stderr)
            return ev.GATE_FAILED_EXIT
    print(ev.summary(metrics))
    return 0
