"""The standard file-to-file job: read a dataset, run a model, write predictions, dead letters, a report.

    DIR/part-*.parquet     predictions (id + model output)
    DIR/failed-*.jsonl     dead letters: id, stage, error, raw record, source file and line
    DIR/report.json        rows_in = rows_out + rows_failed, throughput and engine metrics
"""

from __future__ import annotations

import dataclasses
import json
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bulkinfer import io, progress
from bulkinfer.transform import NAMESPACE, BulkInference


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    input: str
    output: str
    format: str = "parquet"
    id_field: str = "id"
    input_field: str = "text"
    overwrite: bool = False
    batch_rows: int = 1024

    def __post_init__(self):
        if self.format not in io.WRITE_FORMATS:
            raise ValueError(f"unknown output format {self.format!r}; expected one of {io.WRITE_FORMATS}")


def build(p: beam.Pipeline, model, job: JobSpec):
    """Adds the job's transforms to pipeline `p`."""
    out = job.output.rstrip("/")
    rows, read_failed = p | "ReadDataset" >> io.ReadDataset(
        job.input, batch_rows=job.batch_rows).with_exception_handling()
    infer = BulkInference(model, input_field=job.input_field, id_field=job.id_field)
    predictions, infer_failed = rows | "BulkInference" >> infer.with_exception_handling()
    output_field = getattr(model, "output_name", "embedding")
    _ = predictions | "WriteDataset" >> io.WriteDataset(out, format=job.format, columns=[job.id_field, output_field])
    _ = ((read_failed, infer_failed) | "DeadLetters" >> beam.Flatten()
         | "WriteDeadLetters" >> io.WriteDataset(out, format="jsonl", prefix="failed"))


def prepare_output(job: JobSpec) -> None:
    """Refuses to mix a new run into an old one's files unless --overwrite; checks the directory is writable."""
    out = job.output.rstrip("/")
    existing = [m.path for m in FileSystems.match([out + "/*"])[0].metadata_list]
    if existing and not job.overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} files from an earlier run; pass --overwrite to replace them")
    if existing:
        FileSystems.delete(existing)
    try:
        FileSystems.mkdirs(out)
    except OSError:
        if not FileSystems.exists(out):
            raise PermissionError(f"cannot create the output directory {out}") from None
    probe = FileSystems.join(out, ".write-check")
    try:
        with FileSystems.create(probe) as f:
            f.write(b"ok")
        FileSystems.delete([probe])
    except OSError as e:
        raise PermissionError(f"the output directory {out} is not writable ({e})") from None


def run(model, job: JobSpec, pipeline_args: list[str] | None = None) -> dict:
    """Runs the job to completion and returns (and writes) its report."""
    options = PipelineOptions(pipeline_args or [])
    runner_name = options.view_as(StandardOptions).runner
    runner = None
    if not runner_name:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner, runner_name = FnApiRunner(), "FnApiRunner"
    files = io.match_files(job.input)
    prepare_output(job)
    t0 = time.perf_counter()
    with progress.Progress(io.estimate_rows(files)):
        p = beam.Pipeline(runner=runner, options=options)
        build(p, model, job)
        result = p.run()
        result.wait_until_finish()
    elapsed = time.perf_counter() - t0
    report = make_report(_counters(result), elapsed=elapsed, model=getattr(model, "name", str(model)),
                         runner=runner_name)
    with FileSystems.create(FileSystems.join(job.output.rstrip("/"), "report.json")) as f:
        f.write(json.dumps(report, indent=2).encode())
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


def make_report(c: dict[str, float], *, elapsed: float, model: str, runner: str) -> dict:
    rows_in = int(c.get("read_rows", 0) + c.get("read_rows_failed", 0))
    rows_out = int(c.get("part_rows_written", 0))
    rows_failed = int(c.get("failed_rows_written", 0))
    padded = c.get("padded_tokens", 0)
    engines = max(1, int(c.get("model_load_ms_count", 0)))
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_failed": rows_failed,
        "reconciled": rows_in == rows_out + rows_failed,
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(rows_out / elapsed, 1) if elapsed > 0 else None,
        "model": model,
        "runner": runner,
        "batches": int(c.get("batches", 0)),
        "padding_efficiency": round(c.get("real_tokens", 0) / padded, 4) if padded else None,
        "compiles": int(c.get("compiles", 0)),
        "model_load_s": round(c.get("model_load_ms_max", 0) / 1000, 3),
        "engine_busy_fraction": round(c.get("engine_ms", 0) / 1000 / elapsed, 3) if elapsed > 0 else None,
        # Seconds some batch was running on an engine's devices, per engine (one per process that
        # loaded the model), per second of the job.
        "device_busy_fraction": (round(c.get("device_busy_ms", 0) / 1000 / elapsed / engines, 3)
                                 if elapsed > 0 else None),
        "oom_backoffs": int(c.get("oom_backoffs", 0)),
    }
