"""The standard file-to-file job: read a dataset, run a model, write predictions, dead letters, a report.

    DIR/part-*.parquet     predictions (id + model output)
    DIR/failed-*.jsonl     dead letters: id, stage, error, raw record, source file and line
    DIR/_committed/*.json  one commit record per finished unit of work (see beam/commit.py)
    DIR/report.json        rows_in = rows_out + rows_failed, units done/skipped/resumed/reprocessed, speed

The input is cut into units of work (whole files, or ranges of large files: see `plan_units`), run
in waves of `wave_units` units, one Beam pipeline per wave; each unit is committed when its counts
reconcile.  Rerunning the same command after a crash resumes: committed units are skipped, a unit
whose input file changed since its commit (size, modification time) is redone, and only the units
a crash left unfinished run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bulkinfer.beam import commit, io, progress, writers
from bulkinfer.beam.batch import FAILED, NAMESPACE
from bulkinfer.beam.transform import BulkInference
from bulkinfer.beam.units import UNIT_SIZE, Unit, delete, escape_glob, plan_units
from bulkinfer.errors import BadSettings, ModelUnavailable
from bulkinfer.tasks.beam_log import quiet_own_errors
from bulkinfer.tasks.interrupt import interruptible, run_interruptibly

log = logging.getLogger(__name__)
JOB_FILE = "_job.json"
PLAN_FILE = "_plan.json"  # the unit keys of the latest run, to tell resumed units from new ones
# What runs write in DIR: deleted by --overwrite, and not named as others' files.
_OURS = ("part-*", "failed-*", ".tmp-*", "report.json", JOB_FILE, PLAN_FILE, f"{commit.COMMITTED}/*")
_LISTED = 50  # entries of DIR listed to warn of others' files: enough to name a few, cheap on a bucket


class JobFailed(RuntimeError):
    """A wave's pipeline failed (an outage, counts that do not reconcile, too many failed rows).

    Units committed before the failure stay committed; rerunning the same command resumes.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What `run` does.

    unit_size: bytes per unit of work (larger files are split; see `plan_units`).
    wave_units: units per pipeline run; a crash loses at most the wave in flight.  On runners that
      start slowly (Dataflow) make it large.
    max_failed_fraction, min_rows_for_failed_fraction: stop (exit non-zero, nothing more committed) once
      at least that many rows were seen and more than that fraction of them failed; 1.0 never stops.
    allow_missing_ids: predict rows without an id too (default: each is a dead letter).
    accelerator, min_ram: Beam resource hints on the inference stage.
    processes_per_accelerator: SDK processes sharing each GPU on a worker (BulkInference's).
    """

    input: str
    output: str
    format: str = "parquet"
    id_field: str = "id"
    input_field: str | None = None  # default: the model's input name ("text" for text models)
    keep_fields: tuple[str, ...] = ()  # input fields copied to the output beside id and predictions
    overwrite: bool = False
    batch_rows: int = 1024
    unit_size: int = UNIT_SIZE
    wave_units: int = 64
    max_failed_fraction: float = 0.5
    min_rows_for_failed_fraction: int = 1000
    allow_missing_ids: bool = False
    accelerator: str | None = None
    min_ram: str | None = None
    processes_per_accelerator: int | None = None

    def __post_init__(self):
        if self.format not in io.WRITE_FORMATS:
            raise ValueError(f"unknown output format {self.format!r}; expected one of {io.WRITE_FORMATS}")
        if self.unit_size < 1 or self.wave_units < 1:
            raise ValueError(f"unit_size and wave_units must be >= 1, got {self.unit_size} and {self.wave_units}")
        commit.FailureLimit(max_fraction=self.max_failed_fraction, min_rows=self.min_rows_for_failed_fraction)
        if self.processes_per_accelerator is not None and self.processes_per_accelerator < 1:
            raise ValueError(f"processes_per_accelerator must be >= 1, got {self.processes_per_accelerator}")

    @property
    def out(self) -> str:
        """The output directory, absolute: workers write there, and their working directory is not ours."""
        return io.absolute(self.output.rstrip("/") or "/")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The units of this run: all of the input's, those still to do, and why each is to do or not."""

    units: list[Unit]
    todo: list[Unit]
    skipped: int  # committed by an earlier run, input unchanged
    resumed: int  # left unfinished by an earlier run
    reprocessed: int  # committed earlier, but their input file changed since


def build(p: beam.Pipeline, model, job: JobSpec, units: list[Unit], *,
          limit: commit.FailureLimit | None = None, transform: beam.PTransform | None = None,
          preprocess: beam.PTransform | None = None):
    """Adds the job's transforms for `units` to pipeline `p`; returns the commit records' PCollection.

    transform: applied to the predictions (Batches) before they are written, e.g. a postprocessing step.
    preprocess: applied to the rows read (Batches) before inference, e.g. renaming a field; it must
      keep every row and each Batch's unit (one Batch out per Batch in).
    """
    read = p | "ReadDataset" >> io.ReadUnits(units, batch_rows=job.batch_rows)
    rows = read.rows if preprocess is None else read.rows | "Preprocess" >> preprocess
    infer = BulkInference(model, input_field=job.input_field, id_field=job.id_field, keep_fields=job.keep_fields,
                          allow_missing_ids=job.allow_missing_ids, accelerator=job.accelerator, min_ram=job.min_ram,
                          processes_per_accelerator=job.processes_per_accelerator)
    predictions, letters = rows | "BulkInference" >> infer.with_exception_handling()
    if transform is not None:
        predictions = predictions | "Transform" >> transform
    limit = limit or commit.FailureLimit(max_fraction=job.max_failed_fraction,
                                         min_rows=job.min_rows_for_failed_fraction)
    letters = (read[FAILED], letters) | "DeadLetters" >> beam.Flatten()
    # Output rows hold the id, the kept fields and the predictions (BulkInference's keep_fields).
    return (predictions, letters, read[io.COUNTS]) | "CommitUnits" >> commit.CommitUnits(
        job.out, format=job.format, columns=None, limit=limit)


def _settings(model, job: JobSpec) -> dict:
    """What must not change between a run and its resumption (tuning knobs such as the token budget may)."""
    identity = "digest" if getattr(model, "digest", None) else "path"  # content, not the launcher's path
    model_settings = {k: getattr(model, k, None) for k in ("name", identity, "url", "dtype", "max_length")}
    return {"input": io.absolute(job.input), "model": model_settings, "format": job.format,
            "id_field": job.id_field, "input_field": job.input_field or _input_name(model),
            "keep_fields": list(job.keep_fields),
            "unit_size": job.unit_size}


def _input_name(model) -> str | None:
    """The row field a one-input model reads by default (its input's name), if the spec says before loading."""
    inputs = getattr(model, "input_signature", None) or ()
    return inputs[0].name if len(inputs) == 1 else None


def prepare_output(model, job: JobSpec, units: list[Unit]) -> Plan:
    """Makes DIR ready and returns the plan: the units still to process (all, or those not committed)."""
    out = job.out
    _check_writable(out)
    settings_path = FileSystems.join(out, JOB_FILE)
    if job.overwrite:
        ours = [m.path for pattern in _OURS
                for m in FileSystems.match([FileSystems.join(escape_glob(out), pattern)])[0].metadata_list]
        if ours:
            delete(ours)
    elif FileSystems.exists(settings_path):
        with FileSystems.open(settings_path) as f:
            before = json.loads(f.read())
        now = _settings(model, job)
        if before != now:
            changed = "; ".join(f"{k} {before.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(before) | set(now))
                                if before.get(k) != now.get(k))
            raise FileExistsError(f"{out} holds a run with other settings: {changed}; pass --overwrite to replace "
                                  "it, or choose another --output")
    elif FileSystems.match([FileSystems.join(escape_glob(out), "part-*")])[0].metadata_list:
        raise FileExistsError(f"{out} holds outputs that are not from a bulkinfer run; pass --overwrite")
    else:  # nothing of ours to clash with, but a mistyped --output is likelier than a shared folder
        listed = FileSystems.match([FileSystems.join(escape_glob(out), "*")], limits=[_LISTED])[0].metadata_list
        names = sorted(n for n in (m.path.rstrip("/").rsplit("/", 1)[-1] for m in listed)
                       if not any(fnmatch.fnmatchcase(n, ours.split("/")[0]) for ours in _OURS))
        if names:
            log.warning("%s already holds entries that no bulkinfer run wrote (%s%s); the job writes its outputs "
                        "beside them", out, ", ".join(names[:3]), ", ..." if len(names) > 3 else "")
    earlier = set(_read_json(FileSystems.join(out, PLAN_FILE), []))
    _write_json(settings_path, _settings(model, job))
    # Units whose input changed since their commit: forget them (records first, then files).
    current = {u.source: u.fingerprint for u in units}
    stale = [r for r in commit.committed(out).values()
             if r.get("source") in current and r.get("fingerprint") != current[r["source"]]]
    changed = {r["source"] for r in stale}
    if stale:
        log.warning("%d input files changed since their units were committed; redoing them", len(changed))
        commit.forget(out, stale)
    removed = commit.remove_uncommitted(out)
    if removed:
        log.warning("removed %d files that an interrupted run left uncommitted", len(removed))
    done = commit.committed(out)
    todo = [u for u in units if u.key not in done]
    reprocessed = sum(u.source in changed for u in todo)
    resumed = sum(u.source not in changed and u.key in earlier for u in todo)
    _write_json(FileSystems.join(out, PLAN_FILE), [u.key for u in units])
    return Plan(units=units, todo=todo, skipped=len(units) - len(todo), resumed=resumed, reprocessed=reprocessed)


def prediction_files(job: JobSpec) -> list[str]:
    """The committed prediction files (part-*, never the dead letters) of the units of job.input in
    job.output, sorted: what a job that reads a run's predictions (eval, stats) aggregates."""
    keys = {u.key for u in plan_units(io.match_files(job.input), job.unit_size)}
    return sorted(FileSystems.join(job.out, f) for key, record in commit.committed(job.out).items() if key in keys
                  for f in record["files"] if f.startswith("part-"))


def _read_json(path: str, default):
    if not FileSystems.exists(path):
        return default
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def _write_json(path: str, value) -> None:
    with FileSystems.create(writers.temp_name(path)) as f:
        f.write(json.dumps(value, indent=2).encode())
    writers.commit(writers.temp_name(path), path)


def _check_writable(out: str) -> None:
    try:
        writers.ensure_dir(out)
        probe = FileSystems.join(out, ".tmp-write-check")
        with FileSystems.create(probe) as f:
            f.write(b"ok")
        delete([probe])
    except OSError as e:
        raise PermissionError(f"the output directory {out} is not writable ({e})") from None


def run(model, job: JobSpec, pipeline_args: list[str] | None = None, *,
        transform: beam.PTransform | None = None, preprocess: beam.PTransform | None = None) -> dict:
    """Runs the job to completion (resuming an interrupted one) and returns and writes its report.

    transform, preprocess: see `build`.  Raises JobFailed when a wave's pipeline fails (the units committed before
    stay committed), KeyboardInterrupt on Ctrl-C (the same; its text says how many units are kept), and the
    errors of `prepare_output` (FileExistsError, PermissionError).
    """
    options = PipelineOptions(pipeline_args or [])
    runner_name = options.view_as(StandardOptions).runner or "FnApiRunner"
    files = io.match_files(job.input)
    units = plan_units(files, job.unit_size)
    plan = prepare_output(model, job, units)
    keys = {u.key for u in units}
    t0 = time.perf_counter()
    counters: dict[str, float] = {}
    waves = [plan.todo[i:i + job.wave_units] for i in range(0, len(plan.todo), job.wave_units)]
    # Counting rows reads the files once more: only worth it for a person watching the ETA.
    todo_files = list(dict.fromkeys(u.source for u in plan.todo))
    # The live line counts rows in this process: only the embedded runner's workers are here.  Other runners'
    # workers are other processes; the report still adds up their Beam metrics, and the runner's UI shows progress.
    embedded = not options.view_as(StandardOptions).runner
    live = progress.Progress(io.estimate_rows(todo_files) if plan.todo and sys.stderr.isatty() else None) if (
        embedded) else contextlib.nullcontext()

    def kept() -> str:
        return f"units committed so far are kept ({len(commit.committed(job.out))}); rerun the same command to resume"

    own = (BadSettings, ModelUnavailable, commit.UnitNotReconciled, commit.TooManyFailures)  # said in one line
    with live, interruptible(kept), quiet_own_errors(own):  # interruptible: Ctrl-C between waves too
        before = [r for key, r in commit.committed(job.out).items() if key in keys]
        seen, failed = sum(r["rows_in"] for r in before), sum(r["rows_failed"] for r in before)
        for k, wave in enumerate(waves):
            limit = commit.FailureLimit(max_fraction=job.max_failed_fraction,
                                        min_rows=job.min_rows_for_failed_fraction, prior_rows=seen,
                                        prior_failed=failed)
            p = beam.Pipeline(runner=_default_runner(options), options=options)
            build(p, model, job, wave, limit=limit, transform=transform, preprocess=preprocess)
            result = run_interruptibly(p, kept=kept, failed=lambda e, k=k: _wave_failed(e, job, k, len(waves)))
            for record in commit.records_of(job.out, [u.key for u in wave]):
                seen, failed = seen + record["rows_in"], failed + record["rows_failed"]
            for name, value in _counters(result).items():
                counters[name] = max(counters.get(name, 0), value) if name.endswith("_max") else (
                    counters.get(name, 0) + value)
    elapsed = time.perf_counter() - t0
    records = {key: r for key, r in commit.committed(job.out).items() if key in keys}
    outputs = [FileSystems.join(job.out, f) for r in records.values() for f in r["files"]]
    # Counted by the launcher, in this process, whatever the runner: a second job on a cluster runner would cost
    # its start-up (minutes on Dataflow) for 8-24 bytes per id here.
    duplicates = commit.count_duplicate_ids(outputs, job.id_field)
    report = make_report(records, plan, counters, elapsed=elapsed, model=getattr(model, "name", str(model)),
                         runner=runner_name, duplicate_ids=duplicates)
    _write_json(FileSystems.join(job.out, "report.json"), report)
    return report


def _default_runner(options: PipelineOptions):
    """Beam's embedded FnApiRunner unless --runner names another (never the DirectRunner, which downloads Prism)."""
    if options.view_as(StandardOptions).runner:
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _wave_failed(error: Exception, job: JobSpec, k: int, waves: int) -> Exception:
    """What wave k's pipeline failure becomes: BadSettings for a bad setting, else JobFailed saying what is
    kept.  A bad setting or a systemic failure with nothing committed also removes the run's settings, so
    that the corrected command starts afresh instead of being refused as "other settings"."""
    cause = _cause(error)
    settings = cause.startswith(("BadSettings", "bulkinfer.errors.BadSettings"))  # no rerun fixes it
    systemic = "TooManyFailures" in cause  # nor this one, until its cause is fixed
    committed = len(commit.committed(job.out))
    if (settings or systemic) and not committed:
        delete([FileSystems.join(job.out, name) for name in (JOB_FILE, PLAN_FILE)
                if FileSystems.exists(FileSystems.join(job.out, name))])
    if settings:
        return BadSettings(cause.split(": ", 1)[-1])
    then = "" if systemic else "; rerun the same command to resume"
    return JobFailed(f"wave {k + 1} of {waves} failed: {cause}; units committed so far are kept ({committed}){then}")


def _cause(error: BaseException) -> str:
    """The line of a pipeline failure that names its cause (runners wrap it in tracebacks and context)."""
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    for marker in ("BadSettings", "UnitNotReconciled", "TooManyFailures", "ModelUnavailable", "JaxRuntimeError"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[-1].split(" [while running", 1)[0]
    return (lines[-1] if lines else type(error).__name__).split(" [while running", 1)[0]


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


def make_report(records: dict[str, dict], plan: Plan, c: dict[str, float], *, elapsed: float,
                model: str, runner: str, duplicate_ids: int = 0) -> dict:
    """Totals over every committed unit of the input (this run's and earlier ones'), this run's speed and engine figures."""
    rows_in = sum(r["rows_in"] for r in records.values())
    rows_out = sum(r["rows_out"] for r in records.values())
    rows_failed = sum(r["rows_failed"] for r in records.values())
    this_run_in = int(c.get("read_rows", 0) + c.get("read_rows_failed", 0))
    this_run_out = int(c.get("part_rows_written", 0))
    padded = c.get("padded_tokens", 0)
    engines = max(1, int(c.get("model_load_ms_count", 0)))
    files = {u.source for u in plan.units}
    pending = {u.source for u in plan.units if u.key not in records}
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_failed": rows_failed,
        "reconciled": rows_in == rows_out + rows_failed and all(
            r["rows_in"] == r["rows_out"] + r["rows_failed"] for r in records.values()),
        "duplicate_ids": duplicate_ids,
        "files": len(files),
        "files_done": len(files - pending),
        "units": len(plan.units),
        "units_done": len(records),
        # Committed by earlier runs (input unchanged): not redone.
        "units_skipped": plan.skipped,
        # Left unfinished by an interrupted earlier run, done now.
        "units_resumed": plan.resumed,
        # Committed earlier, but their input file changed since: redone, old outputs replaced.
        "units_reprocessed": plan.reprocessed,
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(this_run_out / elapsed, 1) if elapsed > 0 else None,
        # This run's model tokens: a text model's input tokens, a generator's generated tokens.
        "tokens": int(c.get("real_tokens", 0)),
        "tokens_per_s": round(c.get("real_tokens", 0) / elapsed, 1) if elapsed > 0 else None,
        "this_run_rows_in": this_run_in,
        "model": model,
        "runner": runner,
        "batches": int(c.get("batches", 0)),
        "padding_efficiency": round(c.get("real_tokens", 0) / padded, 4) if padded else None,
        "compiles": int(c.get("compiles", 0)),
        "executables_loaded": int(c.get("cache_loads", 0)),  # from the executable cache instead of compiled
        # Worker processes that loaded the model in this run (each loads it once, in DoFn.setup).
        "model_loads": int(c.get("model_load_ms_count", 0)),
        "model_load_s": round(c.get("model_load_ms_max", 0) / 1000, 3),
        # Seconds some batch was running on an engine's devices, per engine (one per process that
        # loaded the model), per second of the job.
        "device_busy_fraction": (round(c.get("device_busy_ms", 0) / 1000 / elapsed / engines, 3)
                                 if elapsed > 0 else None),
        "oom_backoffs": int(c.get("oom_backoffs", 0)),
    }
