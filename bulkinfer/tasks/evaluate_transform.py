"""The `Evaluate` PTransform: prediction rows -> one metrics dict (accuracy, macro F1, log loss, Brier,
ECE, per class and per slice, bootstrap intervals), from Beam combiners over integer counts, so the result
does not depend on sharding.  Also the DoFns the eval job puts around the run job: `RenameFields` (a
label named like a model output) and `ZeroShot` (an embedder as a classifier over class names).

    >>> metrics = predictions | bulkinfer.Evaluate(num_classes=10, label_field="target")

The job that writes metrics.json and the report around it is `bulkinfer.tasks.evaluate`.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import FAILED, Batch, dead_letter
from bulkinfer.metrics.bootstrap import percentile_interval, poisson_weights, row_key
from bulkinfer.metrics.classification import HEADLINE, ClassificationCounts
from bulkinfer.tasks.fields import column, vectors

PROBS_TOLERANCE = 1e-3        # |sum(probs) - 1| allowed: softmax in float32 sums to 1 within ~1e-6
ZERO_SHOT_SCALE = 20.0        # sentence-transformers MultipleNegativesRankingLoss(scale=20.0)

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
