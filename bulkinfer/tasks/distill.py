"""Teacher outputs for distillation: the teacher's predictions, keyed by id, as training shards with a manifest.

    manifest = distill("digits", JobSpec(input="data/digits/test-*.jsonl", output="out/teacher"),
                       DistillSpec(top_k=5, temperature=2.0, format="array_record"))

    DIR/shards/shard-<unit>-<n>.parquet|.array_record   the rows, in input order, one or more per unit of work
    DIR/manifest.json      teacher name and digests, kind, k, T, format, schema, shards (rows, bytes, sha256)
    DIR/COMPLETED          written last: {"manifest_sha256": ...}; shards and manifest are final once it exists
    DIR/predictions/       the teacher run (`bulkinfer.tasks.run`): committed units, dead letters
                           (failed-*.jsonl), report.json with rows_in = rows_out + rows_failed
    DIR/shards/_units/     one record per unit whose shards are written (what a rerun keeps)
    DIR/_distill.json      the settings, which a rerun must repeat (or pass overwrite)

Per row, a classifier (a model with the float output `probs`, softmax probabilities [C]) gives
`top_k_indices` int32 [k] (most probable first; ties: the lower class index first), `top_k_logprobs`
float32 [k], the log-probabilities at temperature T, log_softmax(log(p) / T), which equals
log_softmax(logits / T) because log(p) = logits - logsumexp(logits) differs from the logits by a
constant per row, and `rest_mass` float32, the probability at T outside the top k, so that
rest_mass + sum(exp(top_k_logprobs)) = 1.  An embedder (output `embedding`) gives its embedding.
Other outputs and the kept fields stay as they are.

How it stays consistent and resumable: the teacher runs as the standard run job into DIR/predictions,
with the top-k step as its postprocessing (`run(..., transform=TeacherOutputs(...))`), so its units of
work commit only when rows_in = rows_out + rows_failed, and a rerun resumes.  A second Beam pipeline
turns each committed unit's prediction files into shards (in file order, so the bytes do not depend on
the runner, and a retried bundle rewrites the same files); a unit whose shards are done is not redone.
Then the manifest is written, and COMPLETED last.  Rerunning a COMPLETED job with the same settings and
unchanged inputs does nothing and returns the manifest; with other settings or changed inputs it is
refused (pass overwrite to start again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from bulkinfer.beam import commit, io
from bulkinfer.beam.batch import Batch
from bulkinfer.beam.shards import EXTENSIONS, RECORD_ENCODING, SHARD_FORMATS, ShardWriter, schema_of
from bulkinfer.beam.units import delete, escape_glob, fingerprint
from bulkinfer.beam.writers import ensure_dir, rows_to_table
from bulkinfer.models.resolve import model_spec
from bulkinfer.tasks import run as run_job
from bulkinfer.tasks.interrupt import run_interruptibly

log = logging.getLogger(__name__)
PREDICTIONS = "predictions"
SHARDS = "shards"
UNITS = "_units"
MANIFEST = "manifest.json"
COMPLETED = "COMPLETED"
SETTINGS = "_distill.json"
TOP_K_INDICES, TOP_K_LOGPROBS, REST_MASS = "top_k_indices", "top_k_logprobs", "rest_mass"
PROBS_TOLERANCE = 1e-3  # |sum(p) - 1| a row of probabilities may be off by (float32 softmax: ~1e-6)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillSpec:
    """What `distill` writes beyond the teacher run.

    top_k: classes kept per row (at most the model's C; more is cut to C).  temperature: T > 0.
    format: "parquet" or "array_record" (see `bulkinfer.beam.shards`).
    probs_field, embedding_field: the teacher outputs that make it a classifier or an embedder.
    rows_per_shard: a unit of work with more rows gets several shards.
    """

    top_k: int = 5
    temperature: float = 1.0
    format: str = "parquet"
    probs_field: str = "probs"
    embedding_field: str = "embedding"
    rows_per_shard: int = 100_000

    def __post_init__(self):
        if self.format not in SHARD_FORMATS:
            raise ValueError(f"unknown shard format {self.format!r}; expected one of {SHARD_FORMATS}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


def teacher_top_k(probs: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of softmax probabilities at a temperature.

    probs: [N, C] probabilities (rows sum to 1).  Returns (indices int32 [N, k'], log-probs float32 [N, k'],
    rest mass float32 [N]) with k' = min(k, C): the classes most probable at T (ties: lower index first),
    their log-probabilities log_softmax(log(p) / T) (= log_softmax(logits / T)), and the probability at T
    of the other classes.  Computed in float64; a probability of 0 has log-probability -inf at any T.
    """
    p = np.asarray(probs, np.float64)  # [N, C]
    k = min(k, p.shape[1])
    with np.errstate(divide="ignore"):
        z = np.log(p) / temperature  # [N, C]
    top = z.max(axis=1, keepdims=True)
    shifted = z - top
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # [N, C] log_softmax
    idx = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]  # [N, k]
    top_lp = np.take_along_axis(logprobs, idx, axis=1)  # [N, k]
    outside = np.exp(logprobs)
    np.put_along_axis(outside, idx, 0.0, axis=1)
    return idx.astype(np.int32), top_lp.astype(np.float32), outside.sum(axis=1).astype(np.float32)


def _vectors(batch: Batch, field: str) -> np.ndarray:
    """[N, D] from a column of fixed-size lists or dict rows' arrays."""
    if batch.table is not None:
        column = batch.table.column(field).combine_chunks()
        t = column.type
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), t.list_size)
    return np.stack([np.asarray(r[field]) for r in batch.rows])


def teacher_batch(batch: Batch, *, top_k: int, temperature: float, probs_field: str, embedding_field: str,
                  id_field: str) -> Batch:
    """A predicted batch with its `probs_field` replaced by top_k_indices, top_k_logprobs and rest_mass (an
    embedder's batch passes as a table).  Raises ValueError when the batch has neither field, or when a
    row's probabilities are not finite, negative or do not sum to 1 (the field is not softmax output):
    a systemic fault that stops the job, not a bad row."""
    table = batch.table if batch.table is not None else rows_to_table(batch.rows)
    names = table.column_names
    if probs_field not in names:
        if embedding_field in names:
            return batch.take(range(len(batch)), table)
        outputs = [n for n in names if n != id_field]
        raise ValueError(f"the teacher's rows hold {outputs}: neither {probs_field!r} (a classifier's softmax "
                         f"probabilities) nor {embedding_field!r} (an embedder's vectors); set --probs-field or "
                         "--embedding-field to the model's output")
    probs = _vectors(Batch(table), probs_field)  # [N, C]
    sums = probs.sum(axis=1, dtype=np.float64)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (np.abs(sums - 1) > PROBS_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row_id = table.column(id_field)[i].as_py() if id_field in names else None
        raise ValueError(f"{batch.where(i)} (id {row_id!r}): {probs_field!r} is not a probability vector "
                         f"(min {probs[i].min():g}, sum {sums[i]:g}); --probs-field must name the model's "
                         "softmax probabilities (not logits), which are finite, >= 0 and sum to 1")
    idx, lp, rest = teacher_top_k(probs, top_k, temperature)
    k = idx.shape[1]
    at = names.index(probs_field)
    table = table.remove_column(at)
    for j, (name, column) in enumerate([
            (TOP_K_INDICES, pa.FixedSizeListArray.from_arrays(pa.array(idx.reshape(-1)), k)),
            (TOP_K_LOGPROBS, pa.FixedSizeListArray.from_arrays(pa.array(lp.reshape(-1)), k)),
            (REST_MASS, pa.array(rest))]):
        table = table.add_column(at + j, name, column)
    return batch.take(range(len(batch)), table)


class TeacherOutputs(beam.PTransform):
    """Predicted Batches -> teacher outputs (see `teacher_batch`); the run job's postprocessing step."""

    def __init__(self, spec: DistillSpec, *, id_field: str = "id"):
        super().__init__()
        self._args = dict(top_k=spec.top_k, temperature=spec.temperature, probs_field=spec.probs_field,
                          embedding_field=spec.embedding_field, id_field=id_field)

    def expand(self, pcoll):
        return pcoll | "TopK" >> beam.Map(teacher_batch, **self._args)


class JobRefused(FileExistsError):
    """The output directory holds a distillation with other settings or inputs."""


def distill(model, job: run_job.JobSpec, spec: DistillSpec = DistillSpec(),
            pipeline_args: list[str] | None = None) -> dict:
    """Runs the teacher over `job.input` and writes shards, manifest and COMPLETED under `job.output`.

    model: a built-in name, a model directory or a spec (as for `run`).  job: the teacher run (input, id
    and input fields, kept fields, units, failure limit, overwrite); its predictions go to
    DIR/predictions as Parquet.  pipeline_args: Beam options for both pipelines.
    Returns the manifest (with "already_completed": True when the directory was complete already).
    Raises run.JobFailed when the teacher run fails or leaves units undone (rerun to resume), JobRefused
    (a FileExistsError) for a directory holding another distillation, and `run`'s errors.
    """
    if spec.format == "array_record":
        _check_array_record()
    model = model_spec(model)
    out = job.out
    settings = _settings(model, job, spec)
    teacher = dataclasses.replace(job, output=FileSystems.join(out, PREDICTIONS), format="parquet")
    files = io.match_files(job.input)
    if job.overwrite:
        _remove_distill_files(out)
    else:
        before = _read_json(FileSystems.join(out, SETTINGS))
        if before is not None and before != settings:
            changed = "; ".join(f"{k} {before.get(k)!r} (now {settings.get(k)!r})"
                                for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            raise JobRefused(f"{out} holds a distillation with other settings: {changed}; pass --overwrite to "
                             "replace it, or choose another --output")
        done = _read_json(FileSystems.join(out, COMPLETED))
        if done is not None:
            manifest = _read_json(FileSystems.join(out, MANIFEST))
            if manifest is not None and manifest["input"]["digest"] == _inputs_digest(files):
                log.info("%s is complete already; nothing to do", out)
                return {**manifest, "already_completed": True}
            raise JobRefused(f"{out} is a completed distillation of other inputs (files were added, removed or "
                             "changed since); pass --overwrite to redo it, or choose another --output")
    ensure_dir(out)
    leftovers = _matches(out, MANIFEST)  # of an interrupted run; COMPLETED exists only when all is done
    if leftovers:
        delete(leftovers)
    run_job._write_json(FileSystems.join(out, SETTINGS), settings)
    report = run_job.run(model, teacher, pipeline_args, transform=TeacherOutputs(spec, id_field=job.id_field))
    if not report["reconciled"] or report["units_done"] != report["units"]:
        raise run_job.JobFailed(
            f"the teacher run committed {report['units_done']} of {report['units']} units (rows_in "
            f"{report['rows_in']}, rows_out {report['rows_out']}, rows_failed {report['rows_failed']}); no shards "
            "are written until every unit is; rerun the same command to resume")
    # The current input's committed units, in input order (files sorted, ranges in order).
    wanted = sorted((r for r in commit.committed(teacher.out).values() if r["source"] in set(files)),
                    key=lambda r: (r["source"], r["start"]))
    todo = _prepare_shards(out, wanted)
    if todo:
        options = PipelineOptions(pipeline_args or [])
        p = beam.Pipeline(runner=run_job._default_runner(options), options=options)
        _ = (p | "Units" >> beam.Create(todo)
             | "WriteShards" >> beam.ParDo(_WriteUnitShards(out, spec.format, spec.rows_per_shard)))
        kept = "units whose shards were written are kept; rerun the same command to resume"
        run_interruptibly(p, kept=lambda: kept, failed=lambda e: run_job.JobFailed(
            f"writing shards failed: {run_job._cause(e)}; {kept}"))
    manifest = _manifest(model, job, spec, files, wanted, report)
    path = FileSystems.join(out, MANIFEST)
    run_job._write_json(path, manifest)
    with FileSystems.open(path) as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    run_job._write_json(FileSystems.join(out, COMPLETED), {"manifest_sha256": digest})
    return manifest


def _check_array_record() -> None:
    """Raises ValueError naming the install command when the ArrayRecord writer or msgpack is missing."""
    import importlib.util

    missing = [m for m in ("array_record", "msgpack") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"format 'array_record' needs the packages {missing}: pip install 'bulkinfer[distill]' "
                         "(or use --format parquet)")


def _settings(model, job: run_job.JobSpec, spec: DistillSpec) -> dict:
    return {"teacher": _teacher(model), **dataclasses.asdict(spec), "input": io.absolute(job.input),
            "id_field": job.id_field, "input_field": job.input_field, "keep_fields": list(job.keep_fields),
            "unit_size": job.unit_size}


def _teacher(model) -> dict:
    digest = getattr(model, "digest", None) or None
    return {"name": getattr(model, "name", str(model)), "digest": digest,
            "weights_digest": getattr(model, "params_digest", None) or digest}


def _inputs_digest(files: list[str]) -> str:
    """sha256 over the input files' paths and fingerprints (size, modification time): changes when a file
    is added, removed or changed.  Reads metadata only."""
    parts = []
    for path in files:
        matched = FileSystems.match([escape_glob(path)])[0].metadata_list
        parts.append(f"{path}\0{fingerprint(matched[0]) if matched else 'gone'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _record_digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _read_json(path: str):
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def _matches(directory: str, pattern: str) -> list[str]:
    return [m.path for m in FileSystems.match([FileSystems.join(escape_glob(directory), pattern)])[0].metadata_list]


def _remove_distill_files(out: str) -> None:
    """What an earlier distillation wrote in `out` (COMPLETED first); the teacher run's overwrite does the rest."""
    shards = FileSystems.join(out, SHARDS)
    ours = [p for name in (COMPLETED, MANIFEST, SETTINGS) for p in _matches(out, name)]
    ours += _matches(shards, "shard-*") + _matches(shards, ".tmp-*") + _matches(FileSystems.join(shards, UNITS), "*")
    if ours:
        delete(sorted(ours, key=lambda p: not p.endswith(COMPLETED)))


def _prepare_shards(out: str, wanted: list) -> list[dict]:
    """Deletes stale unit shards (their unit redone or gone) and unreferenced shard files (an interrupted
    unit's); returns the units still to write: {"key", "files" (absolute), "digest"}."""
    shards_dir = FileSystems.join(out, SHARDS)
    units_dir = FileSystems.join(shards_dir, UNITS)
    ensure_dir(units_dir)
    current = {r["key"]: _record_digest(r) for r in wanted}
    keep: set[str] = set()
    for path in _matches(units_dir, "*.json"):
        with FileSystems.open(path) as f:
            entry = json.loads(f.read())
        if current.get(entry["key"]) == entry["record_digest"]:
            keep.update(s["path"] for s in entry["shards"])
        else:
            delete([path])
    doomed = [p for p in _matches(shards_dir, "shard-*") + _matches(shards_dir, ".tmp-*")
              if p.rsplit("/", 1)[1] not in keep]
    if doomed:
        delete(doomed)
    written = {p.rsplit("/", 1)[1].removesuffix(".json") for p in _matches(units_dir, "*.json")}
    teacher = FileSystems.join(out, PREDICTIONS)
    return [{"key": r["key"], "digest": _record_digest(r),
             "files": [FileSystems.join(teacher, f) for f in r["files"] if f.startswith("part-")]}
            for r in wanted if r["key"] not in written]


class _WriteUnitShards(beam.DoFn):
    """One unit's prediction files -> its shards, in file order, then its record in shards/_units/."""

    def __init__(self, out: str, fmt: str, rows_per_shard: int):
        self._out, self._fmt, self._rows_per_shard = out, fmt, rows_per_shard

    def process(self, unit: dict):
        shards_dir = FileSystems.join(self._out, SHARDS)
        schema = _unit_schema(unit["files"])
        written, writer = [], None
        for path in unit["files"]:
            with FileSystems.open(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=min(self._rows_per_shard, 8192)):
                    batch = batch.cast(schema) if batch.schema != schema else batch
                    while batch.num_rows:
                        if writer is None:
                            name = f"shard-{unit['key']}-{len(written):05d}.{EXTENSIONS[self._fmt]}"
                            writer = ShardWriter(FileSystems.join(shards_dir, name), self._fmt, schema)
                        take = min(batch.num_rows, self._rows_per_shard - writer.rows)
                        writer.write(batch.slice(0, take))
                        batch = batch.slice(take)
                        if writer.rows == self._rows_per_shard:
                            written.append(writer.close())
                            writer = None
        if writer is not None:
            written.append(writer.close())
        entries = [{"path": i["path"].rsplit("/", 1)[1], "rows": i["rows"], "bytes": i["bytes"],
                    "sha256": i["sha256"], "schema": schema_of(schema)} for i in written]
        record = {"key": unit["key"], "record_digest": unit["digest"], "rows": sum(e["rows"] for e in entries),
                  "shards": entries}
        run_job._write_json(FileSystems.join(shards_dir, UNITS, f"{unit['key']}.json"), record)
        yield record


def _unit_schema(files: list[str]) -> pa.Schema:
    """One schema for a unit's prediction files (bundles may type a column differently: promoted)."""
    schemas = []
    for path in files:
        with FileSystems.open(path) as f:
            schemas.append(pq.read_schema(f).remove_metadata())
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"the prediction files {files} have columns of incompatible types ({e}); "
                         "make the input's field types consistent") from None


def _manifest(model, job: run_job.JobSpec, spec: DistillSpec, files: list[str], wanted: list[dict],
              report: dict) -> dict:
    shards_dir = FileSystems.join(job.out, SHARDS)
    shards = []
    for r in wanted:
        with FileSystems.open(FileSystems.join(shards_dir, UNITS, f"{r['key']}.json")) as f:
            shards.extend(json.loads(f.read())["shards"])
    schema = shards[0]["schema"] if shards else []
    listed = [{"path": f"{SHARDS}/{s['path']}", "rows": s["rows"], "bytes": s["bytes"], "sha256": s["sha256"],
               **({"schema": s["schema"]} if s["schema"] != schema else {})} for s in shards]
    rows = sum(s["rows"] for s in shards)
    if rows != report["rows_out"]:
        raise run_job.JobFailed(f"the shards hold {rows} rows but the teacher run wrote {report['rows_out']}; "
                                "rerun with --overwrite")
    names = {f["name"]: f for f in schema}
    kind = ("classifier" if TOP_K_LOGPROBS in names else "embedder" if spec.embedding_field in names else None)
    return {
        "teacher": _teacher(model),
        "kind": kind,
        "top_k": names[TOP_K_INDICES]["shape"][0] if kind == "classifier" else None,
        "temperature": spec.temperature if kind == "classifier" else None,
        "id_field": job.id_field,
        "format": spec.format,
        "record_encoding": RECORD_ENCODING if spec.format == "array_record" else None,
        "schema": schema,
        "rows": rows,
        "shards": listed,
        "rows_in": report["rows_in"],
        "rows_out": report["rows_out"],
        "rows_failed": report["rows_failed"],
        "dead_letters": f"{PREDICTIONS}/failed-*.jsonl",
        "input": {"pattern": io.absolute(job.input), "files": len(files), "units": len(wanted),
                  "digest": _inputs_digest(files)},
    }
