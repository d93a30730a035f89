"""Model evaluation: accuracy, macro F1, log loss, Brier, ECE, per class and per slice, with bootstrap
intervals and baseline gating, from Beam combiners whose result does not depend on sharding.

    DIR/predictions/      the standard run job's output (resumable): id, the label (and slice fields) kept,
                          the model's outputs; its report.json counts rows_in = rows_out + rows_failed
    DIR/failed-eval-*.jsonl  prediction rows that could not be evaluated (label missing or not a class,
                          probabilities missing, of the wrong width, not finite or not summing to 1)
    DIR/metrics.json      the numbers (see `metrics_json`)
    DIR/report.html       confusion matrix, reliability diagram, confidence histogram, per-class bars
                          (also as DIR/*.png)

In a user's own pipeline, `Evaluate` (`tasks/evaluate_transform.py`) turns prediction rows into the
metrics dict:

    >>> metrics = predictions | bulkinfer.Evaluate(num_classes=10, label_field="target")

A classifier is a model with a `probs` output [C] (softmax probabilities).  An embedder (an `embedding`
output, e.g. MiniLM) is evaluated as a zero-shot classifier over `class_names`: each class name is
embedded by the same model, and probs = softmax(20 * cosine(row embedding, class embedding)); 20 is
the scale of sentence-transformers' MultipleNegativesRankingLoss (its default `scale`), under which
such models are trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from bulkinfer.beam import io
from bulkinfer.beam.units import escape_glob
from bulkinfer.metrics.classification import HEADLINE, HIGHER_IS_BETTER
from bulkinfer.tasks import run as run_job
from bulkinfer.tasks.evaluate_transform import (  # noqa: F401 - the transform, re-exported for the job's callers
    PROBS_TOLERANCE,
    ZERO_SHOT_SCALE,
    Evaluate,
    RenameFields,
    ZeroShot,
)
from bulkinfer.tasks.interrupt import run_interruptibly

log = logging.getLogger(__name__)

RESULT_FILE = "_eval_result.json"
GATE_FAILED_EXIT = 3


class GateFailed(RuntimeError):
    """A headline metric dropped below the baseline by more than max_drop beyond its interval.

    metrics: the evaluation's metrics (written to metrics.json before this is raised)."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


class NothingEvaluated(RuntimeError):
    """No prediction row could be evaluated (every one failed in prediction or was set aside)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """What `evaluate` does, beside the prediction run's JobSpec.

    label_field: the row field holding the true class: an integer 0..C-1, or with class_names one of the names.
    slice_fields: fields to break the metrics down by (each on its own, value by value).
    probs_field: a classifier's probabilities output [C].  embedding_field: an embedder's output, used
      with class_names for zero-shot classification (see the module docstring).
    class_names: the classes' names, in index order: required for an embedder; for a classifier they
      label the report and let labels be names.
    bootstrap: Poisson-bootstrap replicates (0: no intervals); seed: their seed.
    percentiles: the interval's ends, in percent.
    baseline: a directory holding an earlier eval's metrics.json to gate against.
    max_drop: how far (absolute, in the metric's units) a metric may fall behind the baseline beyond
      its interval before the gate fails; see `gate`.
    """

    label_field: str = "label"
    slice_fields: tuple[str, ...] = ()
    probs_field: str = "probs"
    embedding_field: str = "embedding"
    class_names: tuple[str, ...] | None = None
    bootstrap: int = 0
    seed: int = 0
    percentiles: tuple[float, float] = (2.5, 97.5)
    baseline: str | None = None
    max_drop: float = 0.0

    def __post_init__(self):
        if not self.label_field:
            raise ValueError("label_field is empty; name the field holding the true class, e.g. --label-field label")
        if self.label_field in self.slice_fields:
            raise ValueError(f"{self.label_field!r} is the label field; slicing by it is per_class already")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0 replicates, got {self.bootstrap}")
        if not (len(self.percentiles) == 2 and 0 <= self.percentiles[0] < self.percentiles[1] <= 100):
            raise ValueError(f"percentiles must be two increasing numbers in 0..100, got {self.percentiles}")
        if self.max_drop < 0 or not math.isfinite(self.max_drop):
            raise ValueError(f"max_drop must be a number >= 0, got {self.max_drop}")
        if self.class_names is not None and (len(self.class_names) < 2 or len(set(self.class_names)) < len(
                self.class_names)):
            raise ValueError(f"class_names must be 2 or more distinct names, got {list(self.class_names)}")


def evaluate(model, job: run_job.JobSpec, spec: EvalSpec, pipeline_args: list[str] | None = None) -> dict:
    """Runs `model` over `job.input` into `job.output`/predictions (the resumable run job, keeping the
    label and slice fields), evaluates the predictions in one more Beam pipeline, writes
    DIR/metrics.json and DIR/report.html, and returns the metrics (see `metrics_json`).

    job.output is DIR; job.keep_fields adds fields to keep beyond the label and slice fields.  The
    model is loaded once in this process to learn its outputs (and to embed class_names).  A label or
    slice field named like a model output (digits' "label") is kept as "true_<name>".

    Raises run.JobFailed when the prediction run fails or leaves units uncommitted (rerun to resume),
    ValueError for a model that is neither a classifier nor (with class_names) an embedder, or a
    class_names count that does not match the model's, GateFailed after writing everything when the
    baseline gate fails, and FileNotFoundError for a missing baseline or input.
    """
    from bulkinfer.beam.loading import load_shared

    out = job.out
    baseline = read_baseline(spec.baseline) if spec.baseline else None
    loaded = load_shared(model)
    outputs = {o.name: o for o in loaded.outputs}
    name = getattr(model, "name", str(model))
    transform = None
    if spec.probs_field in outputs:
        width = outputs[spec.probs_field].shape
        if len(width) != 1 or width[0] is None:
            raise ValueError(f"model {name!r}: output {spec.probs_field!r} has shape {list(width)} per row; a "
                             "classifier's probabilities are [C]")
        num_classes = width[0]
        if spec.class_names is not None and len(spec.class_names) != num_classes:
            raise ValueError(f"--class-names gives {len(spec.class_names)} names but model {name!r} has "
                             f"{num_classes} classes")
    elif spec.embedding_field in outputs and spec.class_names:
        num_classes = len(spec.class_names)
        text_input = loaded.inputs[0].name
        class_embeddings = np.asarray(loaded.predict({text_input: list(spec.class_names)})[spec.embedding_field])
        transform = beam.ParDo(ZeroShot(class_embeddings, embedding_field=spec.embedding_field,
                                        probs_field=spec.probs_field))
    elif spec.embedding_field in outputs:
        raise ValueError(f"model {name!r} is an embedder (output {spec.embedding_field!r}), not a classifier; pass "
                         "--class-names a,b,c to evaluate it as a zero-shot classifier over those names")
    else:
        raise ValueError(f"model {name!r} has outputs {sorted(outputs)}: no {spec.probs_field!r} probabilities "
                         f"(set --probs-field) and no {spec.embedding_field!r} embedding to classify by "
                         "--class-names")
    taken = set(outputs) | ({spec.probs_field} if transform is not None else set())
    wanted = (spec.label_field, *spec.slice_fields)
    renames = {f: f"true_{f}" if f == spec.label_field else f"slice_{f}" for f in wanted if f in taken}
    kept = tuple(renames.get(f, f) for f in wanted)
    predictions_dir = FileSystems.join(out, "predictions")
    pred_job = dataclasses.replace(job, output=predictions_dir,
                                   keep_fields=tuple(dict.fromkeys(kept + tuple(job.keep_fields))))
    preprocess = beam.ParDo(RenameFields(renames)) if renames else None
    report = run_job.run(model, pred_job, pipeline_args, transform=transform, preprocess=preprocess)
    if report["units_done"] != report["units"] or not report["reconciled"]:
        raise run_job.JobFailed(f"the prediction run committed {report['units_done']} of {report['units']} units "
                                f"(reconciled: {report['reconciled']}); rerun the same command to finish it")
    files = run_job.prediction_files(pred_job)
    result = _evaluate_files(files, out, num_classes=num_classes, label_field=kept[0],
                             slice_fields=dict(zip(kept[1:], spec.slice_fields)), spec=spec, id_field=job.id_field,
                             pipeline_args=pipeline_args)
    metrics = metrics_json(report, result, spec=spec, model=name, num_classes=num_classes,
                           label_field=spec.label_field, kept_label=kept[0])
    if metrics["rows_evaluated"] == 0:
        run_job._write_json(FileSystems.join(out, "metrics.json"), metrics)
        raise NothingEvaluated(f"no row could be evaluated: {metrics['rows_failed']} failed in prediction "
                               f"({out}/predictions/failed-*.jsonl), {metrics['rows_failed_eval']} were set aside by "
                               f"the evaluation ({out}/failed-eval-*.jsonl); check --label-field and --probs-field")
    if baseline is not None:
        metrics["baseline"] = gate(metrics, baseline, max_drop=spec.max_drop, directory=spec.baseline)
    run_job._write_json(FileSystems.join(out, "metrics.json"), metrics)
    from bulkinfer.reports.evaluation import write_report

    write_report(metrics, out)
    if baseline is not None and not metrics["baseline"]["passed"]:
        compared = metrics["baseline"]["metrics"]
        failed = ", ".join(f"{k} {v['value']:.4g} vs {v['baseline']:.4g} ({'lower' if v['higher_is_better'] else 'higher'}"
                           " is worse)" for k, v in compared.items() if v["failed"])
        margin = "its bootstrap interval" if spec.bootstrap else "the value itself (no --bootstrap interval)"
        raise GateFailed(f"worse than the baseline {spec.baseline} by more than max_drop {spec.max_drop:g}, judged "
                         f"on {margin}: {failed}; see {out}/metrics.json", metrics)
    return metrics


def _evaluate_files(files: list[str], out: str, *, num_classes: int, label_field: str, slice_fields: dict,
                    spec: EvalSpec, id_field: str, pipeline_args) -> dict:
    """One Beam pipeline: prediction files -> Evaluate; dead letters to out/failed-eval-*.jsonl; returns the metrics."""
    stale = [m.path for pattern in ("failed-eval-*", RESULT_FILE)
             for m in FileSystems.match([FileSystems.join(escape_glob(out), pattern)])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)
    options = PipelineOptions(pipeline_args or [])
    result_path = FileSystems.join(out, RESULT_FILE)
    evaluate_ = Evaluate(num_classes=num_classes, label_field=label_field, probs_field=spec.probs_field,
                         id_field=id_field, slice_fields=tuple(slice_fields), class_names=spec.class_names,
                         bootstrap=spec.bootstrap, seed=spec.seed, percentiles=spec.percentiles,
                         field_names={label_field: f"{spec.label_field!r} (kept as {label_field!r})"}
                         if label_field != spec.label_field else None)
    p = beam.Pipeline(runner=run_job._default_runner(options), options=options)
    rows = p | "ReadPredictions" >> (io.ReadDataset(files=files) if files else beam.Create([]))
    metrics, failed = rows | "Evaluate" >> evaluate_.with_exception_handling()
    _ = failed | "WriteFailed" >> io.WriteDataset(out, format="jsonl", prefix="failed-eval")
    _ = metrics | "WriteResult" >> beam.Map(_write_result, result_path)
    run_interruptibly(p, kept=lambda: "the predictions are kept; rerun the same command", failed=lambda e: run_job.JobFailed(
        f"the evaluation pipeline over {len(files)} prediction files failed: {run_job._cause(e)}; rerun the same "
        "command (the predictions are kept)"))
    with FileSystems.open(result_path) as f:
        result = json.loads(f.read())
    FileSystems.delete([result_path])
    if slice_fields and "slices" in result:  # back to the names the user gave
        result["slices"] = {slice_fields.get(k, k): v for k, v in result["slices"].items()}
    return result


def _write_result(metrics: dict, path: str) -> None:
    run_job._write_json(path, metrics)


def metrics_json(report: dict, result: dict, *, spec: EvalSpec, model: str, num_classes: int,
                 label_field: str, kept_label: str) -> dict:
    """DIR/metrics.json: the prediction run's counts, then the evaluation's.

    rows_in, rows_out, rows_failed: the prediction run's (rows_in = rows_out + rows_failed);
    rows_evaluated + rows_failed_eval = rows_out (rows_failed_eval: prediction rows set aside in
    failed-eval-*.jsonl); accuracy, macro_f1, log_loss, brier, ece, confusion_matrix (rows = true
    label), per_class {precision, recall, f1, support}; calibration (the ECE bins); bootstrap (with
    --bootstrap); slices {field: {value: the same metrics}} (with --slice-field); baseline (with --baseline).
    """
    result = _json_safe(result)
    return {"model": model, "rows_in": report["rows_in"], "rows_out": report["rows_out"],
            "rows_failed": report["rows_failed"], "rows_evaluated": result.pop("rows_evaluated"),
            "rows_failed_eval": result.pop("rows_failed"), "label_field": label_field,
            **({"label_kept_as": kept_label} if kept_label != label_field else {}),
            "num_classes": num_classes, "class_names": list(spec.class_names) if spec.class_names else None,
            **result}


def _json_safe(value):
    """value with every NaN float (a rate over no rows) as None, so metrics.json is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def read_baseline(directory: str) -> dict:
    """An earlier eval's metrics.json in `directory`; FileNotFoundError naming it when there is none."""
    path = FileSystems.join(directory.rstrip("/"), "metrics.json")
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"--baseline {directory}: no metrics.json there; point it at an earlier eval's "
                                "--output directory")
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def gate(metrics: dict, baseline: dict, *, max_drop: float, directory: str | None = None) -> dict:
    """Compares the headline metrics with a baseline's.

    For a metric where higher is better (accuracy, macro_f1) with value v and bootstrap interval
    [lo, hi] (without --bootstrap, lo = hi = v), the gate fails when hi < baseline - max_drop: even
    the interval's best end is worse than the baseline by more than max_drop.  Where lower is better
    (log_loss, brier, ece) it fails when lo > baseline + max_drop.  A metric the baseline lacks is
    skipped.  Returns {"directory", "max_drop", "passed", "metrics": {name: {"baseline", "value",
    "interval", "delta" (value - baseline), "higher_is_better", "failed"}}}.
    """
    intervals = metrics.get("bootstrap", {}).get("intervals", {})
    compared = {}
    for name in HEADLINE:
        b, v = baseline.get(name), metrics.get(name)
        if b is None or v is None:
            continue
        lo, hi = intervals.get(name) or (v, v)
        lo, hi = (v if lo is None else lo), (v if hi is None else hi)
        higher = HIGHER_IS_BETTER[name]
        failed = hi < b - max_drop if higher else lo > b + max_drop
        compared[name] = {"baseline": b, "value": v, "interval": intervals.get(name), "delta": v - b,
                          "higher_is_better": higher, "failed": bool(failed)}
    return {"directory": directory, "max_drop": max_drop, "passed": not any(c["failed"] for c in compared.values()),
            "metrics": compared}


def empty_slice_warnings(result: dict) -> list[str]:
    """A line for each slice field that no row had (its one slice is "null": a misspelt --slice-field)."""
    return [f"warning: --slice-field {field} is missing or null in every row (its only slice is null); "
            "check the field's name" for field, values in result.get("slices", {}).items() if list(values) == ["null"]]


def summary(metrics: dict) -> str:
    """A few lines of text with the headline numbers (what the CLI prints)."""
    intervals = metrics.get("bootstrap", {}).get("intervals", {})
    lines = [f"rows_in {metrics['rows_in']}  rows_out {metrics['rows_out']}  rows_failed {metrics['rows_failed']}  "
             f"rows_evaluated {metrics['rows_evaluated']}  rows_failed_eval {metrics['rows_failed_eval']}"]
    for name in HEADLINE:
        v = metrics.get(name)
        iv = intervals.get(name)
        ci = f"  [{iv[0]:.4f}, {iv[1]:.4f}]" if iv and iv[0] is not None else ""
        lines.append(f"{name:<9} {v:.4f}{ci}" if v is not None and not math.isnan(v) else f"{name:<9} n/a")
    if "baseline" in metrics:
        b = metrics["baseline"]
        bad = [k for k, v in b["metrics"].items() if v["failed"]]
        lines.append("baseline: passed" if b["passed"] else f"baseline: FAILED ({', '.join(bad)})")
    return "\n".join(lines + empty_slice_warnings(metrics))
