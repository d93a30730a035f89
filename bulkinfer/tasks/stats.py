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
                                                       # (bulkinfer.tasks.stats_transform)

The run job goes first, then one more Beam pipeline reads the committed prediction files and aggregates
them with `beam.CombinePerKey` over `metrics.PredictionStats` accumulators: no rows are collected on one
worker, and every count, histogram, mean, variance and the cosine sample are identical whatever the
sharding or worker count (KLL quantiles agree within the sketch's stated rank error).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from bulkinfer.beam import io
from bulkinfer.beam.batch import Batch
from bulkinfer.beam.units import delete, escape_glob, input_format
from bulkinfer.metrics.drift import stats_drift
from bulkinfer.tasks import run as run_job
from bulkinfer.tasks.evaluate import empty_slice_warnings
from bulkinfer.tasks.evaluate_transform import RenameFields
from bulkinfer.tasks.interrupt import run_interruptibly
from bulkinfer.tasks.run import JobFailed, JobSpec
from bulkinfer.tasks.stats_transform import (  # noqa: F401 -- the transform's names, re-exported
    OVERALL,
    Layout,
    PredictionStatsFn,
    Statistics,
    StatsSpec,
    arrange,
    slice_value,
)

STATS_FILE = "stats.json"
PREDICTIONS = "predictions"


def stats(model, job: JobSpec, spec: StatsSpec = StatsSpec(),  # noqa: B008 -- a frozen dataclass
          pipeline_args: list[str] | None = None) -> dict:
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
    run_interruptibly(p, kept=lambda: "the predictions are kept; rerun the same command", failed=lambda e: JobFailed(
        f"the statistics pipeline over {len(files)} prediction files failed: {run_job._cause(e)}; rerun the same "
        "command (the predictions are kept)"))
    with FileSystems.open(handoff) as f:
        result = json.loads(f.read())
    delete([handoff])
    return result


def _hand_back(result: dict, path: str) -> None:
    run_job._write_json(path, result)


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
