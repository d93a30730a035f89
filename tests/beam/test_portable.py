"""Jobs on a portable Beam cluster: Beam's Python job service and two external worker pools, each a process.

The Fn API between them is the one Flink, Spark and Dataflow use.  Pool 0 is an ordinary worker; pool 1
is a worker that is not the launcher: another HOME, working directory and weights cache, and no
JAX_COMPILATION_CACHE_DIR.  The job service starts --direct_num_workers SDK worker processes (default 1)
per environment per job, so each wave of a job (a job each) runs its inference stage in new worker
processes; with two, both work on the same stage at once.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkinfer.beam import commit
from bulkinfer.beam.local_cluster import LocalCluster, MeetingPoint, resource_hints
from bulkinfer.models.resolve import model_spec
from bulkinfer.runtime.process import WORKER_LOCAL
from bulkinfer.tasks import run as job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ACCELERATOR = "type:nvidia-h200;count:1"

# A Beam filesystem that every process here can read, standing in for gs:// or s3:// (no network here):
# `shared://a/b` is the file a/b under $SHARED_FS_ROOT.  Pool 1's processes import it at startup (it is
# their sitecustomize); the launcher loads the same file.  Read-only, like a bucket of weights.
SHARED_FS = """
import hashlib, os
from apache_beam.io.filesystem import FileMetadata, FileSystem


class SharedFileSystem(FileSystem):
    @classmethod
    def scheme(cls):
        return "shared"

    def _local(self, path):
        return os.path.join(os.environ["SHARED_FS_ROOT"], path[len("shared://"):])

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def has_dirs(self):
        return False

    def _list(self, prefix):
        root = os.environ["SHARED_FS_ROOT"]
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                path = "shared://" + os.path.relpath(os.path.join(dirpath, name), root)
                if path.startswith(prefix):
                    yield self.metadata(path)

    def open(self, path, mime_type=None, compression_type=None):
        return open(self._local(path), "rb")

    def exists(self, path):
        return os.path.exists(self._local(path))

    def size(self, path):
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        with open(self._local(path), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    def metadata(self, path):
        return FileMetadata(path, self.size(path), self.last_updated(path))

    def _read_only(self, *args, **kwargs):
        raise OSError("shared:// is read-only here")

    mkdirs = create = copy = rename = delete = _read_only
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    for d in ("worker-home", "worker-cwd", "site", "shared"):
        (base / d).mkdir()
    (base / "site" / "sitecustomize.py").write_text(SHARED_FS)
    # Workers import bulkinfer from this checkout, whatever the venv's editable install points at.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    stranger = {"HOME": str(base / "worker-home"), "XDG_CACHE_HOME": None, "JAX_COMPILATION_CACHE_DIR": None,
                "BULKINFER_CACHE_DIR": str(base / "worker-weights"), "SHARED_FS_ROOT": str(base / "shared"),
                "PYTHONPATH": os.pathsep.join([str(base / "site"), pythonpath])}
    with LocalCluster(pools=2, log_dir=base / "logs", pool_env=[{"PYTHONPATH": pythonpath}, stranger],
                      pool_cwd=[None, base / "worker-cwd"]) as c:
        c.base = base
        yield c


def _table(out: Path, id_field: str = "id") -> dict:
    """The output rows as columns, sorted by id."""
    t = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().sort_by(id_field)
    return t.to_pydict()


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_embedding_job_on_portable_workers_equals_the_embedded_runner(cluster, tmp_path):
    texts = json.loads((FIXTURES / "minilm_reference_texts.json").read_text(encoding="utf-8"))[:48]
    for k in range(4):
        _jsonl(tmp_path / f"in-{k}.jsonl", [{"id": f"{k}-{i}", "text": t} for i, t in enumerate(texts[k::4])])
    spec = dict(input=str(tmp_path / "in-*.jsonl"), wave_units=2, accelerator=ACCELERATOR, min_ram="1GB")
    here = model_spec("minilm")
    # The launcher's model directory does not exist on the workers: they find the model by its name.
    elsewhere = dataclasses.replace(here, path=str(tmp_path / "launcher-only" / "model"))
    jobs_before, workers_before = len(cluster.submitted_pipelines()), cluster.workers_started(0)

    report = job.run(elsewhere, job.JobSpec(output=str(tmp_path / "portable"), **spec), cluster.pipeline_args(0))
    embedded = job.run(here, job.JobSpec(output=str(tmp_path / "embedded"), **spec))

    a, b = _table(tmp_path / "portable"), _table(tmp_path / "embedded")
    assert a["id"] == b["id"] and len(a["id"]) == 48
    np.testing.assert_array_equal(np.asarray(a["embedding"]), np.asarray(b["embedding"]))
    assert report["reconciled"] and report["rows_in"] == report["rows_out"] == embedded["rows_out"] == 48
    assert report["rows_failed"] == embedded["rows_failed"] == 0
    assert report["units_done"] == report["units"] == 4 and report["runner"] == "PortableRunner"
    assert json.loads((tmp_path / "portable" / "report.json").read_text()) == report
    # Two waves, two jobs: each loaded the model once, in its own inference worker process (the hinted
    # environment); each job also started one worker process for its other, unhinted, environment.
    assert report["model_loads"] == 2 and report["batches"] >= 2
    assert report["compiles"] + report["executables_loaded"] >= 2  # each worker got its shapes
    assert cluster.workers_started(0) - workers_before == 2 * 2
    waves = cluster.submitted_pipelines()[jobs_before:jobs_before + 2]
    for proto in waves:
        hinted = resource_hints(proto)
        assert [name for name in hinted if "BulkInference/Infer" in name], hinted
        assert all(h == {"beam:resources:accelerator:v1": ACCELERATOR, "beam:resources:min_ram_bytes:v1": "1000000000"}
                   for h in hinted.values())


def _shared_filesystem(root: Path, monkeypatch) -> None:
    """Registers shared:// in this (the launcher's) process, over the pool's store."""
    monkeypatch.setenv("SHARED_FS_ROOT", str(root))
    path = root.parent / "site" / "sitecustomize.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("shared_fs", path))
    module.__spec__.loader.exec_module(module)


def test_digits_job_on_a_worker_that_is_not_the_launcher(cluster, tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    from bulkinfer import JaxModel
    from bulkinfer.models import digits as digits_model

    digits = load_digits()
    for k in range(3):
        _jsonl(tmp_path / f"digits-{k}.jsonl", [{"id": i, "pixels": digits.images[i].tolist(),
                                                 "target": int(digits.target[i])} for i in range(k, 90, 3)])
    # The weights on a filesystem the workers read; the launcher's own cache is its own.
    _shared_filesystem(cluster.base / "shared", monkeypatch)
    (cluster.base / "shared" / "models").mkdir(exist_ok=True)
    shutil.copy(digits_model.weights_path(), cluster.base / "shared" / "models" / "digits.safetensors")
    monkeypatch.setenv("BULKINFER_CACHE_DIR", str(tmp_path / "launcher-cache"))
    model = JaxModel(digits_model.classify, params="shared://models/digits.safetensors", inputs=digits_model.INPUTS,
                     name="digits", compilation_cache_dir=WORKER_LOCAL)
    monkeypatch.chdir(tmp_path)  # relative paths: the worker's working directory is another one
    spec = dict(input="digits-*.jsonl", keep_fields=("target",), wave_units=3)
    report = job.run(model, job.JobSpec(output="portable", **spec), cluster.pipeline_args(1))
    embedded = job.run(model_spec("digits"), job.JobSpec(output="embedded", **spec))

    a, b = _table(tmp_path / "portable"), _table(tmp_path / "embedded")
    assert a["id"] == b["id"] == list(range(90)) and a["target"] == digits.target[:90].tolist()
    assert a["label"] == b["label"] and np.mean(np.asarray(a["label"]) == digits.target[:90]) >= 0.9
    np.testing.assert_array_equal(np.asarray(a["probs"]), np.asarray(b["probs"]))
    assert report["reconciled"] and report["rows_out"] == 90 and report["model_loads"] == 1
    assert embedded["rows_out"] == 90
    # The worker fetched the weights into its own cache, checked against the launcher's digest; compiled
    # into its own default cache (its HOME); and wrote nothing into its working directory.
    fetched = cluster.base / "worker-weights" / model.params_digest / "digits.safetensors"
    assert fetched.read_bytes() == digits_model.weights_path().read_bytes()
    worker_cache = cluster.base / "worker-home" / ".cache" / "bulkinfer" / "xla"
    assert worker_cache.is_dir() and any(worker_cache.iterdir())
    assert not any((cluster.base / "worker-cwd").iterdir())


def test_a_job_on_two_worker_processes_working_at_once(cluster, tmp_path):
    """--direct_num_workers 2: the job service splits each stage's units over two SDK worker processes.
    Each holds at its first rows until the other has arrived (MeetingPoint), so the job finishes only if
    both were processing at the same time; each read and committed units of its own."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k in range(4):
        _jsonl(tmp_path / f"digits-{k}.jsonl", [{"id": i, "pixels": digits.images[i].tolist()} for i in range(k, 80, 4)])
    spec = dict(input=str(tmp_path / "digits-*.jsonl"), wave_units=4)
    meeting = MeetingPoint(str(tmp_path / "met"), parties=2)
    workers_before = cluster.workers_started(0)

    report = job.run(model_spec("digits"), job.JobSpec(output=str(tmp_path / "portable"), **spec),
                     cluster.pipeline_args(0, workers=2), preprocess=beam.ParDo(meeting))
    embedded = job.run(model_spec("digits"), job.JobSpec(output=str(tmp_path / "embedded"), **spec))

    a, b = _table(tmp_path / "portable"), _table(tmp_path / "embedded")
    assert a == b and a["id"] == list(range(80))
    assert report["reconciled"] and report["rows_out"] == embedded["rows_out"] == 80 and report["units_done"] == 4
    met = meeting.arrived()  # "host-pid" of each process that reached the meeting point
    readers = {r["read_by"] for r in commit.committed(str(tmp_path / "portable")).values()}  # "host:pid"
    assert len(met) == 2 and readers == {":".join(m.rsplit("-", 1)) for m in met}
    assert str(os.getpid()) not in {m.rsplit("-", 1)[1] for m in met}  # workers, not the launcher
    assert cluster.workers_started(0) - workers_before == 2 and report["model_loads"] == 2
