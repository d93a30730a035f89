"""`Statistics`: the PTransform that aggregates prediction rows into `bulkinfer stats`' statistics, with its
settings (`StatsSpec`), where its inputs are in a row (`Layout`), its DoFn and CombineFn, and how the groups
become stats.json's "overall" and "slices" (`arrange`).  The job around it is `bulkinfer.tasks.stats`.

    >>> predictions | Statistics(num_classes=10)       # the same aggregation in your own pipeline

Aggregation is `beam.CombinePerKey` over `metrics.PredictionStats` accumulators: no rows are collected on
one worker, and every count, histogram, mean, variance and the cosine sample are identical whatever the
sharding or worker count (KLL quantiles agree within the sketch's stated rank error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import apache_beam as beam

from bulkinfer.beam.batch import FAILED, Batch, Rebatch, dead_letter
from bulkinfer.metrics.prediction_stats import DEFAULT_SAMPLE, QUANTILES, PredictionStats
from bulkinfer.metrics.sketches import DEFAULT_K
from bulkinfer.tasks.fields import column, vectors

log = logging.getLogger(__name__)
OVERALL = ("", "")  # the group key of every row; slices are (field, value text)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatsSpec:
    """What `stats` computes beyond the run job.

    slice_fields: input fields to group rows by (each field separately; kept in the predictions).
    baseline: an earlier stats run's DIR (or its stats.json) to measure drift against.
    probs_field / embedding_field: the model's output names (default: "probs" and "embedding" where the
      predictions have them; a name given here must be there).
    quantiles: normalized ranks in [0, 1].  sketch_k: KLL's k (accuracy vs size; 200 -> ~1.3% rank error).
    sample_size: rows in the mean-pairwise-cosine sample.  seed: of that sample's id hash.
    max_slice_values: per slice field, the most populous values kept in stats.json (the rest are counted).
    report: write DIR/report.html and its PNG figures.
    """

    slice_fields: tuple[str, ...] = ()
    baseline: str | None = None
    probs_field: str | None = None
    embedding_field: str | None = None
    quantiles: tuple[float, ...] = QUANTILES
    sketch_k: int = DEFAULT_K
    sample_size: int = DEFAULT_SAMPLE
    seed: int = 0
    max_slice_values: int = 1000
    report: bool = True

    def __post_init__(self):
        if len(set(self.slice_fields)) != len(self.slice_fields) or not all(self.slice_fields):
            raise ValueError(f"slice fields must be distinct non-empty names, got {list(self.slice_fields)}")
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles are normalized ranks in [0, 1], got {list(self.quantiles)}")
        if not 8 <= self.sketch_k <= 65535:
            raise ValueError(f"sketch_k must be in 8..65535, got {self.sketch_k}")
        if self.sample_size < 2:
            raise ValueError(f"sample_size must be at least 2 (pairs of rows), got {self.sample_size}")
        if self.max_slice_values < 1:
            raise ValueError(f"max_slice_values must be at least 1, got {self.max_slice_values}")
        if self.probs_field and self.probs_field == self.embedding_field:
            raise ValueError(f"probs_field and embedding_field are both {self.probs_field!r}; name two outputs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the statistics' inputs are in a prediction row, found from the first committed row.

    num_classes / dim: None when the predictions have no probabilities / embeddings.
    """

    id_field: str
    slices: tuple[tuple[str, str], ...]  # (column in the predictions, slice field name in stats.json)
    probs_field: str | None = None
    num_classes: int | None = None
    embedding_field: str | None = None
    dim: int | None = None


class Statistics(beam.PTransform):
    """Prediction rows (dicts or `Batch`es) -> a PCollection of one dict, as in stats.json: "rows_failed"
    (rows that could not be summarized), "overall" and, with slice_fields, "slices" {field: {value: ...}}
    (value as text; null as "null"), see `metrics.PredictionStats.to_json`.

        >>> stats = predictions | bulkinfer.Statistics(num_classes=10, slice_fields=["source"])

    num_classes: the width of `probs_field` (softmax probabilities [C]); dim: the width of
    `embedding_field` ([D]); give one or both.  id_field: the row id, hashed to choose the cosine sample.
    quantiles, sketch_k, sample_size, seed, max_slice_values: as in `StatsSpec`.  field_names: {column:
    the name to report it under} for slice columns that were renamed.

    Aggregation is `CombinePerKey` over `PredictionStats` accumulators, one key per group of rows: counts,
    histograms, means, variances and the sample are identical for any sharding or worker count; KLL
    quantiles agree within the sketch's rank error.  A row whose probabilities or embedding is missing,
    not numbers, or of another width fails the pipeline, unless `.with_exception_handling()` is called:
    then the transform returns (stats, dead_letters).  Rows with non-finite values are counted
    (rows_nonfinite), not dead letters.  Raises ValueError when neither num_classes nor dim is given.
    """

    def __init__(self, *, num_classes: int | None = None, dim: int | None = None, probs_field: str = "probs",
                 embedding_field: str = "embedding", id_field: str = "id", slice_fields: Sequence[str] = (),
                 quantiles: Sequence[float] = QUANTILES, sketch_k: int = DEFAULT_K,
                 sample_size: int = DEFAULT_SAMPLE, seed: int = 0, max_slice_values: int = 1000,
                 field_names: dict[str, str] | None = None):
        super().__init__()
        names = field_names or {}
        self._spec = StatsSpec(slice_fields=tuple(names.get(f, f) for f in slice_fields), quantiles=tuple(quantiles),
                               sketch_k=sketch_k, sample_size=sample_size, seed=seed,
                               max_slice_values=max_slice_values)
        self._layout = Layout(id_field=id_field, slices=tuple(zip(slice_fields, self._spec.slice_fields)),
                              probs_field=probs_field if num_classes is not None else None, num_classes=num_classes,
                              embedding_field=embedding_field if dim is not None else None, dim=dim)
        PredictionStatsFn(self._layout, self._spec).create_accumulator()  # checks the sizes here
        self._dead_letters = False

    def with_exception_handling(self) -> Statistics:
        """Return (stats, dead_letters) instead of failing on a row that cannot be summarized."""
        self._dead_letters = True
        return self

    def expand(self, rows):
        parts = (rows
                 | "Batches" >> beam.ParDo(Rebatch())
                 | "Groups" >> beam.ParDo(_Groups(self._layout)).with_outputs(FAILED, main="groups"))
        groups = (parts.groups
                  | "Sketch" >> beam.CombinePerKey(PredictionStatsFn(self._layout, self._spec))
                  | "Collect" >> beam.combiners.ToList())
        failed = parts[FAILED]
        n_failed = failed | "CountFailed" >> beam.combiners.Count.Globally()
        stats = groups | "Arrange" >> beam.Map(_arranged, spec=self._spec, failed=beam.pvalue.AsSingleton(n_failed))
        if self._dead_letters:
            return stats, failed
        _ = failed | "FailOnBadRow" >> beam.Map(_fail)
        return stats


def _arranged(groups: list, *, spec: StatsSpec, failed: int) -> dict:
    return {"rows_failed": failed, **arrange(dict(groups), spec)}


def _fail(letter: dict):
    raise ValueError(f"{letter['error']}; use Statistics(...).with_exception_handling() to set such rows aside")


class PredictionStatsFn(beam.CombineFn):
    """Combines chunks (rows, probs [N, C], embeddings [N, D], ids [N]) into a `PredictionStats` and
    extracts its JSON (quantiles at the spec's ranks)."""

    def __init__(self, layout: Layout, spec: StatsSpec):
        self._layout, self._spec = layout, spec

    def create_accumulator(self) -> PredictionStats:
        return PredictionStats(num_classes=self._layout.num_classes, dim=self._layout.dim, k=self._spec.sketch_k,
                               sample_size=self._spec.sample_size, seed=self._spec.seed)

    def add_input(self, acc: PredictionStats, chunk: dict) -> PredictionStats:
        acc.add(**chunk)
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        first = next(accumulators)
        for acc in accumulators:
            first.merge(acc)
        return first

    def extract_output(self, acc: PredictionStats) -> dict:
        return acc.to_json(self._spec.quantiles)


class _Groups(beam.DoFn):
    """A Batch of prediction rows -> (group key, chunk) for all rows and for each slice value's rows, and
    a dead letter (FAILED) for each row whose probabilities or embedding do not fit."""

    def __init__(self, layout: Layout):
        self._layout = layout

    def process(self, batch: Batch):
        lay = self._layout
        errors: dict[int, str] = {}
        chunk = {"rows": len(batch)}
        if lay.num_classes is not None:
            chunk["probs"] = vectors(batch, lay.probs_field, lay.num_classes, "float64", errors)  # [N, C]
        if lay.dim is not None:
            chunk["embeddings"] = vectors(batch, lay.embedding_field, lay.dim, "float64", errors)  # [N, D]
            chunk["ids"] = column(batch, lay.id_field)
        keep = list(range(len(batch)))
        if errors:
            ids = column(batch, lay.id_field)
            for i in sorted(errors):
                yield beam.pvalue.TaggedOutput(FAILED, dead_letter(
                    stage="stats", error=f"{batch.where(i)}: {errors[i]}", record=batch.row(i), row_id=ids[i],
                    source=batch.source, position=batch.positions[i] if batch.positions is not None else None,
                    unit=batch.unit))
            keep = [i for i in keep if i not in errors]
            chunk = _take(chunk, keep)
        if not keep:
            return
        yield OVERALL, chunk
        for name, field in lay.slices:
            values = column(batch, name)
            groups: dict[str, list[int]] = {}
            for j, i in enumerate(keep):
                groups.setdefault(slice_value(values[i]), []).append(j)
            for value, index in groups.items():
                yield (field, value), _take(chunk, index)


def _take(chunk: dict, index: list[int]) -> dict:
    part = {"rows": len(index)}
    for name in ("probs", "embeddings"):
        if name in chunk:
            part[name] = chunk[name][index]
    if "ids" in chunk:
        part["ids"] = [chunk["ids"][i] for i in index]
    return part


def slice_value(value) -> str:
    """A slice's name for a field value: strings as they are, anything else as its JSON text (null, 3, true)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def arrange(groups: dict[tuple[str, str], dict], spec: StatsSpec) -> dict:
    """{"overall": ..., "slices": {field: {value: ...}}, "slices_left_out": {field: n}} from the groups."""
    overall = groups.get(OVERALL, {"rows": 0})
    slices, left_out = {}, {}
    for field in spec.slice_fields:
        values = sorted(((value, g) for (f, value), g in groups.items() if f == field and (f, value) != OVERALL),
                        key=lambda item: (-item[1]["rows"], item[0]))
        slices[field] = dict(values[:spec.max_slice_values])
        if len(values) > spec.max_slice_values:
            left_out[field] = len(values) - spec.max_slice_values
            log.warning("slice field %r has %d values; stats.json keeps the %d with the most rows",
                        field, len(values), spec.max_slice_values)
    out = {"overall": overall}
    if spec.slice_fields:
        out["slices"] = slices
    if left_out:
        out["slices_left_out"] = left_out
    return out
