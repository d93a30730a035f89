"""The job's costs on this machine, measured by running it on the sample (step 3 of
`bulkinfer.tasks.plan`: runs R1-R6 and the fit of the cost model, in that module's docstring).

    >>> costs = measure(model_spec("minilm"), job, sample_files, workdir)
    >>> costs.seconds(rows=1_000_000, units=100, waves=2)
"""

from __future__ import annotations

import dataclasses
import os
import time

from bulkinfer.beam.loading import release
from bulkinfer.beam.units import plan_units
from bulkinfer.tasks import run as job_run
from bulkinfer.tasks.plan.sampling import one_row_copy

CALIBRATION_UNITS = 4  # k one-row units of runs R5 and R6


@dataclasses.dataclass(frozen=True, kw_only=True)
class Costs:
    """What a run of the job costs on this machine, in seconds (see the module docstring's model)."""

    per_row_s: float
    per_unit_s: float
    per_wave_s: float
    per_run_s: float  # preparing the output, building the pipelines, the duplicate-id pass
    load_compile_s: float  # model load and compile in a fresh process, the compilation cache filled
    first_compile_s: float  # R1: the first run, every shape compiled (what the plan itself paid)
    sample_rows: int
    sample_units: int
    sample_failed: int  # rows of the sample that failed (dead letters)
    compiles: int  # batch shapes the sample compiled or loaded from the executable cache in R2
    device: str

    def seconds(self, *, rows: int, units: int, waves: int) -> float:
        """Predicted wall time of a run over `rows` rows in `units` units of work and `waves` waves."""
        return (self.per_run_s + self.load_compile_s + waves * self.per_wave_s + units * self.per_unit_s
                + rows * self.per_row_s)


def measure(model, job: job_run.JobSpec, sample_files: list[str], workdir: str,
            pipeline_args: list[str] | None = None) -> Costs:
    """Runs the job on the sample (R1-R6 of the module docstring) in `workdir`; returns the fitted costs.

    Raises JobFailed when a sample run fails (as the job itself would), with the sample run named.
    """
    import jax

    devices = jax.devices()
    device = f"{devices[0].platform}: {len(devices)} x {devices[0].device_kind}"
    counter = iter(range(1_000_000))

    def timed(spec, files: list[str], **settings) -> tuple[float, dict]:
        """Wall time of the job over exactly `files` (all of one directory, or one file), and its report."""
        pattern = files[0] if len(files) == 1 else os.path.join(os.path.dirname(files[0]), "*")
        this = dataclasses.replace(job, input=pattern, output=os.path.join(workdir, f"out-{next(counter)}"),
                                   overwrite=True, **settings)
        t0 = time.perf_counter()
        try:
            report = job_run.run(spec, this, pipeline_args)
        except job_run.JobFailed as e:
            raise job_run.JobFailed(f"the plan's run on a sample of the input failed: {e}") from e
        return time.perf_counter() - t0, report

    one = os.path.join(workdir, "one")
    os.makedirs(one)
    k = CALIBRATION_UNITS
    for i in range(k):
        one_row_copy(sample_files[0], os.path.join(one, f"row-{i}{_extension(sample_files[0])}"))
    ones = sorted(os.path.join(one, name) for name in os.listdir(one))
    sample_units = len(plan_units(sample_files, job.unit_size))

    release(model)
    first = _with_warmup(model)
    try:
        t1, _ = timed(first, sample_files)  # R1: fills the compilation cache
        release(first)
        t2, fresh = timed(model, sample_files)  # R2: load and compile as a new process
        t3, warm = timed(model, sample_files)  # R3: loaded
        t4, _ = timed(model, ones[:1])  # R4: one row, one unit
        t5, _ = timed(model, ones, wave_units=k)  # R5: k units, one wave
        t6, _ = timed(model, ones, wave_units=1)  # R6: k units, k waves
    finally:
        release(first)
        release(model)
    n, u = warm["rows_in"], sample_units
    per_wave = max(0.0, (t6 - t5) / (k - 1))
    unit_and_row = max(0.0, (t5 - t4) / (k - 1))  # per_unit + per_row (each calibration unit is one row)
    if n > u:
        per_row = max(0.0, (t3 - t4 - (u - 1) * unit_and_row) / (n - u))
    else:
        per_row = unit_and_row
    per_unit = max(0.0, unit_and_row - per_row)
    per_run = max(0.0, t4 - per_wave - per_unit - per_row)
    return Costs(per_row_s=per_row, per_unit_s=per_unit, per_wave_s=per_wave, per_run_s=per_run,
                 load_compile_s=max(0.0, t2 - t3), first_compile_s=t1, sample_rows=n, sample_units=u,
                 sample_failed=warm["rows_failed"], compiles=fresh["compiles"] + fresh["executables_loaded"],
                 device=device)


def _with_warmup(model):
    """The spec with every batch shape compiled at load (R1), if the spec has the setting."""
    if dataclasses.is_dataclass(model) and any(f.name == "warmup" for f in dataclasses.fields(model)):
        return dataclasses.replace(model, warmup=True)
    return model


def _extension(path: str) -> str:
    return os.path.splitext(path)[1]
