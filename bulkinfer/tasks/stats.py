"""`bulkinfer stats`: statistics of a model's predictions over a dataset, from mergeable sketches.

    DIR/predictions/   the standard run job's output (predictions with the slice fields kept, dead letters,
                       commits, report.json): rerunning the same command resumes it
    DIR/stats.json     rows_in, rows_out, rows_failed; the sketch's k and rank error; "overall" and, per
                       --slice-field, "slices" {field: {value: ...}} with, for each group of rows:
                         classifier (probs [C]): predicted-class counts, confidence (top probability),
                           margin (top1 - top2) and entropy (bits): mean, std, KLL quantiles, histogram;
                         embedder (embedding [D]): L2 norm (mean, std, quantiles, histogram), per-dimension
                           mean and variance, mean pairwise cosine on a bottom-k sample by id hash;
                       and with a baseline, "drift": Jensen-Shannon distances per distribution
    DIR/report.html    class distribution, confidence histogram and drift figures (also as PNG files)
    DIR/failed-stats-*.jsonl  prediction rows whose probabilities or embedding do not fit (rows_failed_stats)

    >>> from bulkinfer.tasks.run import JobSpec
    >>> stats("digits", JobSpec(input="data/digits/*.jsonl", output="out/"), StatsSpec(slice_fields=("grp",)))
    >>> predictions | Statistics(num_classes=10)       # the same aggregation in your own pipeline

The run job goes first, then one more Beam pipeline reads the committed prediction files and aggregates
them with `beam.CombinePerKey` over `metrics.PredictionStats` accumulators: no rows are collected on one
worker, and every count, histogram, mean, variance and the cosine sample are identical whatever the
sharding or worker count (KLL quantiles agree within the sketch's stated rank error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from bulkinfer.beam import io
from bulkinfer.beam.batch import FAILED, Batch, Rebatch, dead_letter
from bulkinfer.beam.units import delete, escape_glob, input_format
from bulkinfer.metrics.drift import stats_drift
from bulkinfer.metrics.prediction_stats import DEFAULT_SAMPLE, QUANTILES, PredictionStats
from bulkinfer.metrics.sketches import DEFAULT_K
from bulkinfer.tasks import run as run_job
from bulkinfer.tasks.evaluate import empty_slice_warnings
from bulkinfer.tasks.evaluate_transform import RenameFields
from bulkinfer.tasks.fields import column, vectors
from bulkinfer.tasks.run import JobFailed, JobSpec

log = logging.getLogger(__name__)
STATS_FILE = "stats.json"
PREDICTIONS = "predictions"
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


def stats(model, job: JobSpec, spec: StatsSpec = StatsSpec(), pipeline_args: list[str] | None = None) -> dict:
    """Runs the model over job.input into job.output/predictions (resuming), then computes, writes and
    returns DIR/stats.json's content (and DIR/report.html unless spec.report is False).

    job.output is DIR; its keep_fields are extended with the slice fields (a slice field named like a
    model output, e.g. digits' "label", is kept as "slice_<name>").  pipeline_args go to both
    pipelines (e.g. --direct_num_workers=2 --direct_running_mode=multi_processing).
    Raises JobFailed (a pipeline failed, or the predictions' counts do not reconcile), FileNotFoundError
    (no input, or no baseline stats.json), ValueError (a named output missing, a baseline that is not a
    stats.json) and the run job's errors.
    """
    baseline = _read_baseline(spec.baseline) if spec.baseline else None
    columns = slice_columns(model, spec.slice_fields)
    predictions = dataclasses.replace(job, output=FileSystems.join(job.out, PREDICTIONS),
                                      keep_fields=tuple(dict.fromkeys(job.keep_fields + tuple(columns.values()))))
    renames = {f: c for f, c in columns.items() if f != c}
    preprocess = beam.ParDo(RenameFields(renames)) if renames else None
    report = run_job.run(model, predictions, pipeline_args, preprocess=preprocess)
    if not report["reconciled"] or report["units_done"] != report["units"]:
        raise JobFailed(f"the predictions in {predictions.out} are incomplete (rows_in {report['rows_in']}, rows_out "
                        f"{report['rows_out']}, rows_failed {report['rows_failed']}; units {report['units_done']} of "
                        f"{report['units']}); rerun the same command to finish them")
    files = run_job.prediction_files(predictions)
    layout = find_layout(files, spec, id_field=job.id_field, slice_columns=columns)
    summarized = (aggregate(files, layout, spec, pipeline_args, out=job.out) if layout
                  else {"rows_failed": 0, **arrange({}, spec)})
    result = {"model": getattr(model, "name", str(model)), "input": io.absolute(job.input),
              "predictions": predictions.out,
              **{k: report[k] for k in ("rows_in", "rows_out", "rows_failed")},
              "rows_failed_stats": summarized.pop("rows_failed"),
              "fields": {"id": job.id_field, "probs": layout and layout.probs_field,
                         "embedding": layout and layout.embedding_field},
              "sketch": sketch_info(spec.sketch_k), "quantile_ranks": list(spec.quantiles),
              **summarized}
    if baseline is not None:
        result["drift"] = {"baseline": baseline["path"], **drift(result, baseline["stats"])}
    run_job._write_json(FileSystems.join(job.out, STATS_FILE), result)
    if spec.report:
        from bulkinfer.reports.stats import write_report

        write_report(job.out, result, baseline["stats"] if baseline else None)
    return result


def slice_columns(model, slice_fields: Sequence[str]) -> dict[str, str]:
    """{slice field: the column that keeps it in the predictions}: the field's own name, or "slice_<name>"
    for a field named like one of the model's outputs (digits' "label"), which would overwrite it.

    Loads the model in this process (once; the in-process runner shares it) to learn its outputs, only
    when there are slice fields.
    """
    if not slice_fields:
        return {}
    from bulkinfer.beam.loading import load_shared

    outputs = {o.name for o in load_shared(model).outputs}
    return {f: f"slice_{f}" if f in outputs else f for f in slice_fields}


def find_layout(files: list[str], spec: StatsSpec, *, id_field: str,
                slice_columns: dict[str, str] | None = None) -> Layout | None:
    """Which outputs the predictions hold and their widths, from the first row of the first non-empty file;
    None when there is no prediction row at all.  Raises ValueError naming the columns when a named
    output is missing or neither "probs" nor "embedding" is there, or when one is not a vector."""
    row = next((r for path in files for r in _first_rows(path)), None)
    if row is None:
        return None
    columns = list(row)
    found = {}
    for kind, given, default in (("probs", spec.probs_field, "probs"),
                                 ("embedding", spec.embedding_field, "embedding")):
        name = given or default
        if name not in row:
            if given:
                raise ValueError(f"the predictions have no field {given!r} (--{kind}-field); their fields are "
                                 f"{columns}")
            continue
        width = np.asarray(row[name]).shape
        if len(width) != 1 or width[0] < 1:
            raise ValueError(f"prediction field {name!r} should be a vector per row, got shape {width}; name the "
                             f"model's {kind} output with --{kind}-field")
        found[kind] = (name, width[0])
    if not found:
        raise ValueError(f"the predictions hold neither 'probs' (a classifier) nor 'embedding' (an embedder); their "
                         f"fields are {columns}; name the output with --probs-field or --embedding-field")
    slices = tuple((slice_columns or {}).get(f, f) for f in spec.slice_fields)
    missing = [c for c in slices if c not in row]
    if missing:
        raise ValueError(f"slice fields {missing} are not in the predictions (fields {columns})")
    probs, embedding = found.get("probs", (None, None)), found.get("embedding", (None, None))
    return Layout(id_field=id_field, slices=tuple(zip(slices, spec.slice_fields)), probs_field=probs[0],
                  num_classes=probs[1],
                  embedding_field=embedding[0], dim=embedding[1])


def _first_rows(path: str):
    """The first row of a prediction file (none when it is empty)."""
    with FileSystems.open(path) as f:
        if input_format(path) == "parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1):
                if batch.num_rows:
                    yield Batch(batch).row(0)
                    return
        else:
            for line in f:
                if line.strip():
                    yield json.loads(line)
                    return


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


def aggregate(files: list[str], layout: Layout, spec: StatsSpec, pipeline_args: list[str] | None = None, *,
              out: str) -> dict:
    """Runs the statistics pipeline over prediction files; returns `Statistics`' dict.

    out: the job's directory: rows that cannot be summarized go to out/failed-stats-*.jsonl, and one
    small file hands the result back (then deleted).  Raises JobFailed when the pipeline fails.
    """
    stale = [m.path for m in FileSystems.match([FileSystems.join(escape_glob(out), "failed-stats-*")])[0].metadata_list]
    if stale:
        delete(stale)
    options = PipelineOptions(pipeline_args or [])
    handoff = FileSystems.join(out, f".tmp-stats-{uuid.uuid4().hex}.json")
    statistics = Statistics(num_classes=layout.num_classes, dim=layout.dim,
                            probs_field=layout.probs_field or "probs",
                            embedding_field=layout.embedding_field or "embedding", id_field=layout.id_field,
                            slice_fields=[c for c, _ in layout.slices], quantiles=spec.quantiles,
                            sketch_k=spec.sketch_k, sample_size=spec.sample_size, seed=spec.seed,
                            max_slice_values=spec.max_slice_values, field_names=dict(layout.slices))
    p = beam.Pipeline(runner=run_job._default_runner(options), options=options)
    result, failed = p | "ReadPredictions" >> io.ReadDataset(files=files) | statistics.with_exception_handling()
    _ = failed | "WriteFailed" >> io.WriteDataset(out, format="jsonl", prefix="failed-stats")
    _ = result | "HandBack" >> beam.Map(_hand_back, handoff)
    try:
        p.run().wait_until_finish()
    except Exception as e:  # noqa: BLE001 -- any pipeline failure: say what failed
        raise JobFailed(f"the statistics pipeline over {len(files)} prediction files failed: "
                        f"{run_job._cause(e)}; rerun the same command (the predictions are kept)") from e
    with FileSystems.open(handoff) as f:
        result = json.loads(f.read())
    delete([handoff])
    return result


def _hand_back(result: dict, path: str) -> None:
    run_job._write_json(path, result)


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


def sketch_info(k: int) -> dict:
    """The quantile sketch's name, k and a-priori normalized rank errors, for stats.json."""
    from importlib.metadata import version

    from datasketches import kll_floats_sketch

    return {"library": f"Apache DataSketches KLL, kll_floats_sketch (datasketches {version('datasketches')})",
            "k": k, "normalized_rank_error": kll_floats_sketch.get_normalized_rank_error(k, False),
            "normalized_rank_error_pmf": kll_floats_sketch.get_normalized_rank_error(k, True),
            "meaning": "a quantile's true rank is within normalized_rank_error of the rank asked for, with 99% "
                       "confidence; KLL is randomized, so quantiles can differ between runs and shardings within "
                       "that error, while counts, histograms, means, variances and the cosine sample cannot"}


def drift(current: dict, baseline: dict) -> dict:
    """Jensen-Shannon distances of `current`'s distributions from `baseline`'s (two stats.json contents),
    overall and for each slice present in both; what could not be compared is listed under "skipped"."""
    out: dict = {"metric": "Jensen-Shannon distance, base 2 (the square root of the Jensen-Shannon divergence "
                           "of Lin 1991): 0 = the same distribution, 1 = disjoint",
                 "overall": {}, "skipped": []}
    out["overall"], skipped = stats_drift(current["overall"], baseline["overall"])
    out["skipped"] += [f"overall {s}" for s in skipped]
    if current.get("slices"):
        out["slices"] = {}
        for field, values in current["slices"].items():
            theirs = baseline.get("slices", {}).get(field)
            if theirs is None:
                out["skipped"].append(f"slice field {field!r}: not in the baseline")
                continue
            out["slices"][field] = {}
            for value, group in values.items():
                if value not in theirs:
                    out["skipped"].append(f"slice {field}={value}: not in the baseline")
                    continue
                out["slices"][field][value], skipped = stats_drift(group, theirs[value])
                out["skipped"] += [f"slice {field}={value} {s}" for s in skipped]
    return out


def _read_baseline(path: str) -> dict:
    """{"path", "stats"} of an earlier run: DIR or DIR/stats.json."""
    file = path if path.endswith(".json") else FileSystems.join(path.rstrip("/"), STATS_FILE)
    if not FileSystems.exists(file):
        raise FileNotFoundError(f"no baseline statistics at {file}; pass --baseline the DIR of an earlier "
                                "`bulkinfer stats` run")
    with FileSystems.open(file) as f:
        content = json.loads(f.read())
    if not isinstance(content, dict) or "overall" not in content:
        raise ValueError(f"{file} is not a stats.json of `bulkinfer stats` (it has no 'overall')")
    return {"path": file, "stats": content}


def summary(result: dict) -> list[str]:
    """A few lines of text for a person: rows, the headline numbers and the drift."""
    lines = [f"rows_in {result['rows_in']}  rows_out {result['rows_out']}  rows_failed {result['rows_failed']}"]
    overall = result["overall"]
    c, e = overall.get("classifier"), overall.get("embedder")
    if c:
        counts = c["class_counts"]
        top = sorted(range(len(counts)), key=lambda i: -counts[i])[:5]
        lines.append("predicted classes (most frequent): " + ", ".join(f"{i}: {counts[i]}" for i in top))
        lines.append(f"confidence median {_fmt(c['confidence']['quantiles'].get('0.5'))}  mean "
                     f"{_fmt(c['confidence']['mean'])}; margin median {_fmt(c['margin']['quantiles'].get('0.5'))}; "
                     f"entropy mean {_fmt(c['entropy_bits']['mean'])} bits")
    if e:
        lines.append(f"embedding norm median {_fmt(e['norm']['quantiles'].get('0.5'))}  mean {_fmt(e['norm']['mean'])}; "
                     f"mean pairwise cosine {_fmt(e['cosine_sample']['mean_pairwise_cosine'])} "
                     f"({e['cosine_sample']['size']} sampled rows)")
    if "drift" in result:
        d = result["drift"]["overall"]
        lines.append("drift (JS distance): " + (", ".join(f"{k} {_fmt(v)}" for k, v in d.items()) or "none comparable"))
    return lines + empty_slice_warnings(result)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def group_names(result: dict) -> Sequence[tuple[str, dict]]:
    """("overall", group) then ("field=value", group) for every slice, in stats.json's order."""
    out = [("overall", result["overall"])]
    for field, values in result.get("slices", {}).items():
        out += [(f"{field}={value}", g) for value, g in values.items()]
    return out
