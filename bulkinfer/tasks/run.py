"""The standard file-to-file job: read a dataset, run a model, write predictions, dead letters, a report.

    DIR/part-*.parquet     predictions (id + model output)
    DIR/failed-*.jsonl     dead letters: id, stage, error, raw record, source file and line
    DIR/_committed/*.json  one commit record per finished input file (see shards.py)
    DIR/report.json        rows_in = rows_out + rows_failed, throughput and engine metrics

Rerunning the same command after a crash resumes: input files already committed are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bulkinfer.beam import io, progress, shards
from bulkinfer.beam.batch import NAMESPACE
from bulkinfer.beam.transform import BulkInference

log = logging.getLogger(__name__)
JOB_FILE = "_job.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    input: str
    output: str
    format: str = "parquet"
    id_field: str = "id"
    input_field: str | None = None  # default: the model's input name ("text" for text models)
    keep_fields: tuple[str, ...] = ()  # input fields copied to the output beside id and predictions
    overwrite: bool = False
    batch_rows: int = 1024

    def __post_init__(self):
        if self.format not in io.WRITE_FORMATS:
            raise ValueError(f"unknown output format {self.format!r}; expected one of {io.WRITE_FORMATS}")

    @property
    def out(self) -> str:
        return self.output.rstrip("/")


def build(p: beam.Pipeline, model, job: JobSpec, files: list[str]):
    """Adds the job's transforms for `files` to pipeline `p`."""
    # Dead letters reach the writer inside each file's SourceDone marker, on the same chain as its rows;
    # the separate dead-letter outputs are not needed here.
    rows, _ = p | "ReadDataset" >> io.ReadDataset(
        job.input, files=files, batch_rows=job.batch_rows, markers=True).with_exception_handling()
    infer = BulkInference(model, input_field=job.input_field, id_field=job.id_field, keep_fields=job.keep_fields)
    predictions, _ = rows | "BulkInference" >> infer.with_exception_handling()
    # Output rows hold the id, the kept fields and the predictions (BulkInference's keep_fields).
    return predictions | "CommitShards" >> shards.CommitShards(job.out, format=job.format, columns=None)


def _settings(model, job: JobSpec) -> dict:
    """What must not change between a run and its resumption (tuning knobs such as the token budget may)."""
    model_settings = {k: getattr(model, k, None) for k in ("name", "digest" if getattr(model, "digest", None) else "path", "url", "dtype", "max_length")}
    return {"input": io.absolute(job.input), "model": model_settings, "format": job.format,
            "id_field": job.id_field, "input_field": job.input_field, "keep_fields": list(job.keep_fields)}


def prepare_output(model, job: JobSpec, files: list[str]) -> list[str]:
    """Makes DIR ready and returns the input files still to process (all, or those a crash left)."""
    out = job.out
    _check_writable(out)
    settings_path = FileSystems.join(out, JOB_FILE)
    if job.overwrite:
        ours = [m.path for pattern in ("part-*", "failed-*", ".tmp-*", "report.json", JOB_FILE, "_committed/*")
                for m in FileSystems.match([FileSystems.join(out, pattern)])[0].metadata_list]
        if ours:
            FileSystems.delete(ours)
    elif FileSystems.exists(settings_path):
        with FileSystems.open(settings_path) as f:
            before = json.loads(f.read())
        if before != _settings(model, job):
            raise FileExistsError(f"{out} holds a run with other settings ({before}); pass --overwrite to replace it")
    elif FileSystems.match([FileSystems.join(out, "part-*")])[0].metadata_list:
        raise FileExistsError(f"{out} holds outputs that are not from a bulkinfer run; pass --overwrite")
    with FileSystems.create(settings_path) as f:
        f.write(json.dumps(_settings(model, job)).encode())
    removed = shards.remove_uncommitted(out)
    if removed:
        log.warning("removed %d files that an interrupted run left uncommitted", len(removed))
    done = shards.committed(out)
    return [f for f in files if f not in done]


def _check_writable(out: str) -> None:
    try:
        io.ensure_dir(out)
        probe = FileSystems.join(out, ".tmp-write-check")
        with FileSystems.create(probe) as f:
            f.write(b"ok")
        FileSystems.delete([probe])
    except OSError as e:
        raise PermissionError(f"the output directory {out} is not writable ({e})") from None


def run(model, job: JobSpec, pipeline_args: list[str] | None = None) -> dict:
    """Runs the job to completion (resuming an interrupted one) and returns and writes its report."""
    options = PipelineOptions(pipeline_args or [])
    runner_name = options.view_as(StandardOptions).runner
    runner = None
    if not runner_name:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner, runner_name = FnApiRunner(), "FnApiRunner"
    files = io.match_files(job.input)
    todo = prepare_output(model, job, files)
    t0 = time.perf_counter()
    counters: dict[str, float] = {}
    if todo:
        # Counting rows reads the files once more: only worth it for a person watching the ETA.
        with progress.Progress(io.estimate_rows(todo) if sys.stderr.isatty() else None):
            p = beam.Pipeline(runner=runner, options=options)
            build(p, model, job, todo)
            result = p.run()
            result.wait_until_finish()
        counters = _counters(result)
    elapsed = time.perf_counter() - t0
    report = make_report(shards.committed(job.out), files, counters, elapsed=elapsed,
                         model=getattr(model, "name", str(model)), runner=runner_name)
    path = FileSystems.join(job.out, "report.json")
    with FileSystems.create(io.temp_name(path)) as f:
        f.write(json.dumps(report, indent=2).encode())
    io.commit(io.temp_name(path), path)
    return report


def _counters(result) -> dict[str, float]:
    totals: dict[str, float] = {}
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for c in metrics["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (value or 0)
    for d in metrics["distributions"]:
        value = d.committed if d.committed is not None else d.attempted
        if value is not None and value.count:
            totals[d.key.metric.name + "_max"] = max(totals.get(d.key.metric.name + "_max", 0), value.max)
            totals[d.key.metric.name + "_count"] = totals.get(d.key.metric.name + "_count", 0) + value.count
    return totals


def make_report(records: dict[str, dict], files: list[str], c: dict[str, float], *, elapsed: float,
                model: str, runner: str) -> dict:
    """Totals over every committed input file (this run's and earlier ones'), this run's speed and engine figures."""
    rows_in = sum(r["rows_in"] for r in records.values())
    rows_out = sum(r["rows_out"] for r in records.values())
    rows_failed = sum(r["rows_failed"] for r in records.values())
    this_run_in = int(c.get("read_rows", 0) + c.get("read_rows_failed", 0))
    this_run_out = int(c.get("part_rows_written", 0))
    padded = c.get("padded_tokens", 0)
    engines = max(1, int(c.get("model_load_ms_count", 0)))
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_failed": rows_failed,
        "reconciled": rows_in == rows_out + rows_failed and all(
            r["rows_in"] == r["rows_out"] + r["rows_failed"] for r in records.values()),
        "files": len(files),
        "files_done": sum(f in records for f in files),
        "files_resumed_from_earlier_runs": int(len(records) - c.get("sources_committed", 0)),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(this_run_out / elapsed, 1) if elapsed > 0 else None,
        "this_run_rows_in": this_run_in,
        "model": model,
        "runner": runner,
        "batches": int(c.get("batches", 0)),
        "padding_efficiency": round(c.get("real_tokens", 0) / padded, 4) if padded else None,
        "compiles": int(c.get("compiles", 0)),
        "model_load_s": round(c.get("model_load_ms_max", 0) / 1000, 3),
        # Seconds some batch was running on an engine's devices, per engine (one per process that
        # loaded the model), per second of the job.
        "device_busy_fraction": (round(c.get("device_busy_ms", 0) / 1000 / elapsed / engines, 3)
                                 if elapsed > 0 else None),
        "oom_backoffs": int(c.get("oom_backoffs", 0)),
    }
