"""`bulkinfer plan`: how long a job takes on this machine, how many accelerators a deadline needs, what it costs.

    >>> from bulkinfer.models.resolve import model_spec
    >>> from bulkinfer.tasks.run import JobSpec
    >>> job = JobSpec(input="data/*.parquet", output="")          # the job to size; output is not used
    >>> report = plan(model_spec("minilm"), job, PlanSpec(sample=2000, deadline_s=7200, price_per_hour=3.5))
    >>> report["predicted_seconds"], report["tolerance"], report["accelerators_needed"], report["cost"]

How it answers (one module each: `counting`, `sampling`, `measuring`, `estimating`):

1. **Rows.**  Counted as a run counts its rows_in (`count_rows`): Parquet from the files' footers; JSONL
   by a scan of the bytes for lines that are not blank (no JSON parsing); CSV by counting lines, or, for
   a file holding a quote character or a carriage return (a quoted field may hold a newline), by
   parsing it with the reader's own parser (`io.csv_records`).
2. **A sample of the real rows** (`sample_rows`): `sample` rows spread over the files in proportion to
   their rows, evenly spaced within each file (long files: evenly spaced runs of consecutive rows, read
   with seeks), so the sample has the input's length distribution and its share of bad rows.  The rows
   are copied verbatim into sample files of the input's format.  Deterministic: the same input gives
   the same sample.
3. **Measured, not assumed** (`measure`).  The sample runs through the job itself (`tasks.run.run`:
   Beam's embedded FnApiRunner, reading, tokenization, bucketing, the engine on this machine's
   devices, writing, commits), several times, each timed from call to return:
       R1  a first run with every batch shape compiled (`warmup`), which fills the persistent
           compilation cache as a first run on the machine does; not used in the fit;
       R2  the sample, the model loaded afresh (as a new `bulkinfer run` process does);
       R3  the sample again, the model already loaded: R2 - R3 = load and compile of a fresh process;
       R4  one row, one unit; R5  k one-row units in one wave; R6  the same k units, one per wave.
   A run's wall time is modelled as
       T = per_run + load_compile + waves * per_wave + units * per_unit + rows * per_row
   and R3-R6 give the four costs besides load_compile exactly (four equations, four unknowns; a
   negative one, from noise, becomes 0).  The plan drops the model it loaded, and any instance this
   process held before (`loading.release`), so the job that follows, in this process or another,
   starts as R2 did.  The model: what a new process pays before its first row (load, and compiles
   read from the cache) and what each wave, unit and row costs; a job may use batch shapes that the
   sample did not (read from the cache R1 filled), which the sample's R2 does not count.
4. **The answer** (`estimate`): predicted_seconds for this machine running the whole job, with the
   stated tolerance; accelerator-hours; with a deadline, how many accelerators (workers like this
   machine, or of `--accelerator` type at `--rows-per-s`) finish in time; the cost at a price per
   accelerator-hour; and the assumptions, in words.

The speed of another accelerator is never invented: without `rows_per_s` measured there, the per-row
time is this machine's, and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

from bulkinfer.beam import io
from bulkinfer.beam.units import plan_units
from bulkinfer.tasks import run as job_run
from bulkinfer.tasks.plan.counting import count_rows
from bulkinfer.tasks.plan.estimating import (
    TOLERANCE,
    PlanSpec,
    assumptions,
    estimate,
    parse_duration,
    same_device,
)
from bulkinfer.tasks.plan.measuring import CALIBRATION_UNITS, Costs, measure
from bulkinfer.tasks.plan.sampling import RUN_ROWS, WHOLE_FILE_BYTES, allocate, sample_rows

__all__ = ["CALIBRATION_UNITS", "TOLERANCE", "Costs", "PlanSpec", "allocate", "assumptions", "count_rows",
           "estimate", "measure", "parse_duration", "plan", "same_device", "sample_rows", "summary", "RUN_ROWS",
           "WHOLE_FILE_BYTES"]


def plan(model, job: job_run.JobSpec, spec: PlanSpec = PlanSpec(),  # noqa: B008 (frozen)
         pipeline_args: list[str] | None = None) -> dict:
    """Sizes `job` (its input, format and unit settings; job.output is not used) for `model`.

    Returns the report: rows, files, units, waves, the measured costs, predicted_seconds and tolerance,
    accelerator_hours, accelerators_needed (for spec.deadline_s), cost (at spec.price_per_hour) and
    the assumptions.  Raises FileNotFoundError when nothing matches the input, JobFailed when the
    sample's run fails, and the model's load errors.
    """
    files = io.match_files(job.input)
    counts = [count_rows(f) for f in files]
    rows = sum(counts)
    units = plan_units(files, job.unit_size)
    waves = math.ceil(len(units) / job.wave_units)
    if not rows:
        raise ValueError(f"{job.input!r} holds no rows to plan for ({len(files)} file(s), all empty)")
    with tempfile.TemporaryDirectory(prefix="bulkinfer-plan-") as workdir:
        sample_dir = os.path.join(workdir, "sample")
        os.makedirs(sample_dir)
        sample_files = sample_rows(files, counts, spec.sample, sample_dir)
        if not sample_files:
            raise ValueError(f"{job.input!r}: no row of the input could be sampled (unreadable files?)")
        costs = measure(model, job, sample_files, workdir, pipeline_args)
    report = {
        "model": getattr(model, "name", str(model)),
        "input": job.input,
        "files": len(files),
        "rows": rows,
        "rows_per_file": dict(zip(files, counts)) if len(files) <= 20 else None,
        "units": len(units),
        "waves": waves,
        "device": costs.device,
        "accelerator": spec.accelerator,
        "rows_per_s_given": spec.rows_per_s,
        "sample_rows": costs.sample_rows,
        "measured": {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(costs).items()},
    }
    report.update(estimate(costs, rows=rows, units=len(units), waves=waves, spec=spec))
    report["assumptions"] = assumptions(costs, rows=rows, files=len(files), spec=spec, job=job)
    return report


def summary(report: dict) -> str:
    """The report as lines for a person (the CLI without --json)."""
    m = report["measured"]
    lines = [
        f"rows: {report['rows']:,} in {report['files']} file(s), {report['units']} unit(s) of work, "
        f"{report['waves']} wave(s)",
        f"measured on this machine ({report['device']}): a sample of {report['sample_rows']:,} rows, "
        f"{m['per_row_s'] * 1000:.3f} ms per row; fixed {m['load_compile_s']:.1f} s load and compile, "
        f"{m['per_run_s']:.2f} s per run, {m['per_wave_s']:.2f} s per wave, {m['per_unit_s'] * 1000:.1f} ms per unit",
        f"predicted_seconds on this machine: {report['predicted_seconds']:,.1f} s "
        f"({report['predicted_seconds'] / 3600:.2f} h), tolerance +-{report['tolerance']:.0%}",
        f"accelerator-hours: {report['accelerator_hours']:.3f}",
    ]
    if report["deadline_seconds"] is not None:
        if report["accelerators_needed"] is None:
            lines.append(f"deadline: {report['deadline_problem']}")
        else:
            lines.append(f"deadline {report['deadline_seconds']:g} s: {report['accelerators_needed']} accelerator(s), "
                         f"done in about {report['wall_seconds_with_accelerators']:,.0f} s")
            if report.get("deadline_problem"):
                lines.append(f"deadline not met: {report['deadline_problem']}")
    if report["cost"] is not None:
        lines.append(f"cost at {report['price_per_hour']:g} per accelerator-hour: {report['cost']:,.2f}")
    lines.append("assumptions:")
    lines.extend(f"  - {a}" for a in report["assumptions"])
    return "\n".join(lines)
