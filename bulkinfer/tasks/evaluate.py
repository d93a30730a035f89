"""Model evaluation: accuracy, macro F1, log loss, Brier, ECE, per class and per slice, with bootstrap
intervals and baseline gating, from Beam combiners whose result does not depend on sharding.

    DIR/predictions/      the standard run job's output (resumable): id, the label (and slice fields) kept,
                          the model's outputs; its report.json counts rows_in = rows_out + rows_failed
    DIR/failed-eval-*.jsonl  prediction rows that could not be evaluated (label missing or not a class,
                          probabilities missing, of the wrong width, not finite or not summing to 1)
    DIR/metrics.json      the numbers (see `metrics_json`)
    DIR/report.html       confusion matrix, reliability diagram, confidence histogram, per-class bars
                          (also as DIR/*.png)

In a user's own pipeline, `Evaluate` turns prediction rows into the metrics dict:

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
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from bulkinfer.beam import io
from bulkinfer.beam.batch import FAILED, Batch, dead_letter
from bulkinfer.beam.units import escape_glob
from bulkinfer.metrics.bootstrap import percentile_interval, poisson_weights, row_key
from bulkinfer.metrics.classification import HEADLINE, HIGHER_IS_BETTER, ClassificationCounts
from bulkinfer.tasks import run as run_job
from bulkinfer.tasks.fields import column, vectors

log = logging.getLogger(__name__)

PROBS_TOLERANCE = 1e-3        # |sum(probs) - 1| allowed: softmax in float32 sums to 1 within ~1e-6
ZERO_SHOT_SCALE = 20.0        # sentence-transformers MultipleNegativesRankingLoss(scale=20.0)
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


# ---------------------------------------------------------------------------------------------------
# Beam: prediction rows -> metrics dict


class Evaluate(beam.PTransform):
    """Prediction rows (dicts or `Batch`es) -> a PCollection of one metrics dict.

    Each row holds its true class in `label_field` (int 0..C-1, or a name in class_names), its
    probabilities in `probs_field` (C numbers summing to 1, evaluated as float32) and, with
    `bootstrap`, an id in `id_field`.  The dict holds rows_evaluated, rows_failed (rows that could not
    be evaluated), the metrics of `ClassificationCounts.metrics`, "calibration" (the 15 ECE bins),
    with bootstrap > 0 "bootstrap": {"replicates", "seed", "percentiles", "intervals": {metric: [lo,
    hi]}}, and with slice_fields "slices": {field: {value: metrics}} (value as text; null as "null").

    Aggregation runs in Beam combiners over `ClassificationCounts` (integer state), so the numbers are
    identical for any sharding, bundle size or worker count.  Slices get the metrics without intervals.
    Rows are aggregated in the global window (a bounded dataset).  A bad row fails the pipeline, unless
    `.with_exception_handling()` is called: then the transform returns (metrics, dead_letters).

    Raises ValueError for num_classes < 2 or too many replicates for num_classes (see ClassificationCounts).
    """

    def __init__(self, *, num_classes: int, label_field: str = "label", probs_field: str = "probs",
                 id_field: str = "id", slice_fields=(), class_names=None, bootstrap: int = 0, seed: int = 0,
                 percentiles=(2.5, 97.5), field_names: dict[str, str] | None = None):
        super().__init__()
        ClassificationCounts(num_classes=num_classes, replicates=max(1, bootstrap))  # checks the sizes here
        self._prepare = _Prepare(num_classes=num_classes, label_field=label_field, probs_field=probs_field,
                                 id_field=id_field, slice_fields=tuple(slice_fields),
                                 class_names=tuple(class_names) if class_names else None,
                                 seed=seed if bootstrap else None, field_names=field_names or {})
        self._c, self._bootstrap, self._seed = num_classes, bootstrap, seed
        self._percentiles = tuple(percentiles)
        self._dead_letters = False

    def with_exception_handling(self) -> Evaluate:
        """Return (metrics, dead_letters) instead of failing on a row that cannot be evaluated."""
        self._dead_letters = True
        return self

    def expand(self, rows):
        parts = rows | "Prepare" >> beam.ParDo(self._prepare).with_outputs(FAILED, _SLICE, main="overall")
        overall = parts.overall | "Overall" >> beam.CombineGlobally(_CountsFn(self._c, self._bootstrap))
        slices = parts[_SLICE] | "Slices" >> beam.CombinePerKey(_CountsFn(self._c, 0))
        failed = parts[FAILED]
        n_failed = failed | "CountFailed" >> beam.combiners.Count.Globally()
        metrics = overall | "Metrics" >> beam.Map(
            _assemble, slices=beam.pvalue.AsList(slices), failed=beam.pvalue.AsSingleton(n_failed),
            seed=self._seed, percentiles=self._percentiles)
        if self._dead_letters:
            return metrics, failed
        _ = failed | "FailOnBadRow" >> beam.Map(_fail)
        return metrics


_SLICE = "slice"


def _fail(letter):
    raise ValueError(f"{letter['error']}; use Evaluate(...).with_exception_handling() to set such rows aside")


class _Prepare(beam.DoFn):
    """A Batch (or dict row) -> ("overall" output) (labels int64 [n], probs float32 [n, C], row keys uint64
    [n] or None), (SLICE output) ((field, value), (labels, probs, None)) per slice value, and a dead
    letter per row that cannot be evaluated."""

    def __init__(self, *, num_classes, label_field, probs_field, id_field, slice_fields, class_names, seed,
                 field_names):
        self._field_names = field_names
        self._c, self._label, self._probs, self._id = num_classes, label_field, probs_field, id_field
        self._slices, self._names, self._seed = slice_fields, class_names, seed
        self._index = {name: i for i, name in enumerate(class_names or ())}

    def process(self, element):
        batch = element if isinstance(element, Batch) else Batch([element])
        n = len(batch)
        if n == 0:
            return
        errors: dict[int, str] = {}
        labels = self._labels(batch, errors)
        probs = _probs(batch, self._probs, self._c, errors)
        ids = column(batch, self._id) if (self._id and (self._seed is not None or errors)) else [None] * n
        keys = None
        if self._seed is not None:
            keys = np.zeros(n, np.uint64)
            for i, row_id in enumerate(ids):
                if i in errors:
                    continue
                if row_id is None:
                    errors[i] = (f"field {self._id!r} is missing or null; bootstrap weights derive from the row id, "
                                 "so every row needs one")
                else:
                    keys[i] = row_key(row_id, self._seed)
        for i in sorted(errors):
            where = batch.where(i) + (f" (id {ids[i]!r})" if ids[i] is not None else "")
            yield beam.pvalue.TaggedOutput(FAILED, dead_letter(
                stage="eval", error=f"{where}: {errors[i]}", record=batch.row(i), row_id=ids[i],
                source=batch.source, position=batch.positions[i] if batch.positions is not None else i + 1))
        good = np.setdiff1d(np.arange(n), np.fromiter(errors, np.int64, len(errors)), assume_unique=True)
        if good.size == 0:
            return
        labels, probs = labels[good], probs[good]
        yield labels, probs, None if keys is None else keys[good]
        for field in self._slices:
            values = column(batch, field)
            groups: dict[str, list[int]] = {}
            for j, i in enumerate(good.tolist()):
                groups.setdefault(_slice_value(values[i]), []).append(j)
            for value, idx in groups.items():
                yield beam.pvalue.TaggedOutput(_SLICE, ((field, value), (labels[idx], probs[idx], None)))

    def _labels(self, batch: Batch, errors: dict[int, str]) -> np.ndarray:
        """int64 [n]; rows whose label is missing, not a class index or not a class name get an error."""
        c, field = self._c, self._label
        shown = self._field_names.get(field, repr(field))
        t = batch.table
        if t is not None and field in t.column_names and pa.types.is_integer(t.column(field).type) and (
                t.column(field).null_count == 0):
            labels = t.column(field).to_numpy().astype(np.int64)
            for i in np.flatnonzero((labels < 0) | (labels >= c)).tolist():
                errors[i] = f"field {shown} holds {int(labels[i])}, outside the classes 0..{c - 1}"
            return np.where((labels < 0) | (labels >= c), 0, labels)
        labels = np.zeros(len(batch), np.int64)
        for i, v in enumerate(column(batch, field)):
            if v is None:
                errors[i] = f"field {shown} is missing or null; set --label-field to the field holding the true class"
            elif isinstance(v, str) and v in self._index:
                labels[i] = self._index[v]
            elif isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating) or (
                    isinstance(v, float | np.floating) and not float(v).is_integer()):
                names = f" or one of {list(self._names)}" if self._names else ""
                errors[i] = f"field {shown} holds {v!r}, not a class index 0..{c - 1}{names}"
            elif not 0 <= int(v) < c:
                errors[i] = f"field {shown} holds {v!r}, outside the classes 0..{c - 1}"
            else:
                labels[i] = int(v)
        return labels


def _slice_value(value) -> str:
    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value.tolist() if hasattr(value, "tolist") else value,
                                                           sort_keys=True, default=str)


def _probs(batch: Batch, field: str, c: int, errors: dict[int, str]) -> np.ndarray:
    """float32 [n, C] (`fields.vectors`: a fixed-size list column without per-row Python, else row by row).

    Rows whose probabilities are missing, not C numbers, not finite, outside [0, 1] or not summing to 1
    (within PROBS_TOLERANCE) get an error; their row of the result is never used.
    """
    out = vectors(batch, field, c, "float32", errors,
                  missing="; set --probs-field to the model's probabilities output")  # [n, C]
    finite = np.isfinite(out).all(axis=1)
    in_range = ((out >= 0) & (out <= 1 + PROBS_TOLERANCE)).all(axis=1)
    sums = out.astype(np.float64).sum(axis=1)
    for i in np.flatnonzero(~finite | ~in_range | (np.abs(sums - 1) > PROBS_TOLERANCE)).tolist():
        if i in errors:
            continue
        if not finite[i]:
            errors[i] = f"field {field!r} holds a non-finite value (NaN or infinity)"
        elif not in_range[i]:
            errors[i] = f"field {field!r} holds values outside [0, 1]; pass probabilities (softmax), not logits"
        else:
            errors[i] = (f"field {field!r} sums to {sums[i]:.6g}, not 1; pass probabilities (softmax) over all "
                         f"{c} classes")
    out[~finite] = 1.0 / c
    return out


class _CountsFn(beam.CombineFn):
    """(labels, probs, keys) chunks -> (ClassificationCounts, bootstrap ClassificationCounts or None)."""

    def __init__(self, num_classes: int, replicates: int):
        self._c, self._r = num_classes, replicates

    def create_accumulator(self):
        boot = ClassificationCounts(num_classes=self._c, replicates=self._r) if self._r else None
        return ClassificationCounts(num_classes=self._c), boot

    def add_input(self, acc, chunk):
        labels, probs, keys = chunk
        main, boot = acc
        main.add(labels, probs)
        if boot is not None:
            boot.add(labels, probs, poisson_weights(keys, self._r))
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        main, boot = accs[0]
        main.merge(a[0] for a in accs[1:])
        if boot is not None:
            boot.merge(a[1] for a in accs[1:])
        return main, boot

    def extract_output(self, acc):
        return acc


def _assemble(overall, *, slices, failed: int, seed: int, percentiles) -> dict:
    main, boot = overall
    result = {"rows_evaluated": main.rows(), "rows_failed": int(failed), **main.metrics(),
              "calibration": main.calibration()}
    result.pop("rows")
    if boot is not None:
        values = {name: [boot.headline(r)[name] for r in range(boot.replicates)] for name in HEADLINE}
        result["bootstrap"] = {"replicates": boot.replicates, "seed": seed, "percentiles": list(percentiles),
                               "method": "Poisson(1) bootstrap, weights from (seed, row id, replicate); "
                                         "percentile intervals",
                               "intervals": {k: percentile_interval(v, percentiles) for k, v in values.items()}}
    if slices:
        out: dict[str, dict] = {}
        for (field, value), (counts, _) in sorted(slices, key=lambda kv: kv[0]):
            m = counts.metrics()
            out.setdefault(field, {})[value] = {"rows": m.pop("rows"), **m}
        result["slices"] = out
    return result


# ---------------------------------------------------------------------------------------------------
# Pre- and postprocessing of the prediction run


class RenameFields(beam.DoFn):
    """Batches (or dict rows) with fields renamed {old: new}, keeping each Batch's unit, source and positions."""

    def __init__(self, renames: dict[str, str]):
        self._renames = dict(renames)

    def process(self, element):
        if not isinstance(element, Batch):
            yield {self._renames.get(k, k): v for k, v in element.items()}
            return
        if element.table is not None:
            t = element.table
            rows = t.rename_columns([self._renames.get(k, k) for k in t.column_names])
        else:
            rows = [{self._renames.get(k, k): v for k, v in row.items()} for row in element.rows]
        yield Batch(rows, source=element.source, positions=element.positions, unit=element.unit,
                    from_rows=element.from_rows)


class ZeroShot(beam.DoFn):
    """Adds `probs_field` float32 [C] = softmax(scale * cosine(embedding, class_embeddings)) to each
    prediction Batch (or dict row) that holds `embedding_field` [D].

    class_embeddings: float32 [C, D], the embedded class names.  scale: 20, as sentence-transformers'
    MultipleNegativesRankingLoss.  A row without a usable embedding gets no probs (the eval stage then
    makes it a dead letter naming the field).
    """

    def __init__(self, class_embeddings: np.ndarray, *, embedding_field: str = "embedding",
                 probs_field: str = "probs", scale: float = ZERO_SHOT_SCALE):
        e = np.asarray(class_embeddings, np.float32)
        self._classes = e / np.linalg.norm(e, axis=1, keepdims=True)                # [C, D]
        self._field, self._probs, self._scale = embedding_field, probs_field, scale

    def process(self, element):
        batch = element if isinstance(element, Batch) else Batch([element], from_rows=True)
        rows = [dict(r) for r in batch.rows]
        d = self._classes.shape[1]
        ok = [i for i, r in enumerate(rows) if r.get(self._field) is not None and np.shape(r[self._field]) == (d,)]
        if ok:
            emb = np.stack([np.asarray(rows[i][self._field], np.float32) for i in ok])   # [n, D]
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            z = self._scale * (emb @ self._classes.T)                                   # [n, C]
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
            for j, i in enumerate(ok):
                rows[i][self._probs] = probs[j]
        out = Batch(rows, source=batch.source, positions=batch.positions, unit=batch.unit, from_rows=batch.from_rows)
        if isinstance(element, Batch):
            yield out
        else:
            yield out.rows[0]


# ---------------------------------------------------------------------------------------------------
# The job


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
    with beam.Pipeline(runner=run_job._default_runner(options), options=options) as p:
        rows = p | "ReadPredictions" >> (io.ReadDataset(files=files) if files else beam.Create([]))
        metrics, failed = rows | "Evaluate" >> evaluate_.with_exception_handling()
        _ = failed | "WriteFailed" >> io.WriteDataset(out, format="jsonl", prefix="failed-eval")
        _ = metrics | "WriteResult" >> beam.Map(_write_result, result_path)
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
