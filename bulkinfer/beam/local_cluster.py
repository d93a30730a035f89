"""A local portable Beam cluster: Beam's Python job service and external SDK worker pools, each its own process.

    with LocalCluster(pools=2, log_dir="out/cluster") as cluster:
        report = bulkinfer.tasks.run.run("minilm", job, cluster.pipeline_args(pool=0))
        cluster.workers_started(0)          # SDK worker processes pool 0 started so far
        cluster.submitted_pipelines()       # the pipeline protos the job service received

The job service (Beam's `LocalJobServicer`, started by `python -m bulkinfer.beam.local_cluster`, see
`serve_jobs`) takes jobs from `--runner PortableRunner --job_endpoint`; each worker pool
(`apache_beam.runners.worker.worker_pool_main`) starts one SDK worker process (`python -c ...`, hence
this Python's directory first on its PATH) per worker the job service asks for.  They speak the Fn API
that Flink, Spark and Dataflow use, so a job that runs here finds no launcher state on its workers.
The job service asks for `--direct_num_workers` workers per environment per job (default 1) and runs
each stage on all of them at once, its input split between them; Beam's own `local_job_service_main`
always asks for one.  A resource-hinted inference stage runs in its own worker processes, and every
wave of `bulkinfer run` (a job each) in new ones.

Everything listens on 127.0.0.1 ports picked free; `stop()` (or leaving the `with` block) interrupts each
process, waits for it, and kills its process group if it does not exit.  Used by tests/beam/test_portable.py
and scripts/cluster_demo.py (`make cluster-demo`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import apache_beam as beam

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, *, timeout_s: float, log: Path) -> None:
    """Returns once 127.0.0.1:port accepts connections.  Raises RuntimeError naming the command and its
    log's last lines when `proc` exits first or the port is still closed after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode} before listening on port "
                               f"{port}; its log {log} ends: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(proc.args)} is not listening on port {port} after {timeout_s:.0f} s; "
                                   f"its log {log} ends: {_tail(log)}") from None
            time.sleep(0.1)  # polling a port with a deadline


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(unreadable)"


class LocalCluster:
    """A job service and `pools` external worker pools on this machine, each a child process.

    pools: how many worker pools (each an --environment_config address).
    log_dir: each process's output goes to job_service.log and pool-K.log there; the job service stages
      artifacts under log_dir/staging.
    pool_env: per pool, environment variables set on top of this process's (e.g. another HOME,
      BULKINFER_CACHE_DIR, JAX_COMPILATION_CACHE_DIR); a value None removes the variable.
    pool_cwd: per pool, its (and its workers') working directory; default: this process's.
    python: the interpreter of every process; its directory goes first on PATH, because a pool starts
      its workers as `python -c ...` and they must import Beam and bulkinfer.
    Raises RuntimeError from `start()` when a process exits early or does not listen within START_TIMEOUT_S.
    """

    def __init__(self, *, pools: int = 2, log_dir: str | os.PathLike,
                 pool_env: Sequence[Mapping[str, str | None]] | None = None,
                 pool_cwd: Sequence[str | os.PathLike | None] | None = None, python: str = sys.executable):
        if pools < 1:
            raise ValueError(f"pools must be >= 1, got {pools}")
        for name, given in (("pool_env", pool_env), ("pool_cwd", pool_cwd)):
            if given is not None and len(given) != pools:
                raise ValueError(f"{name} has {len(given)} entries; give one per pool ({pools})")
        self._pools = pools
        self._log_dir = Path(log_dir)
        self._pool_env = list(pool_env or [{}] * pools)
        self._pool_cwd = list(pool_cwd or [None] * pools)
        self._python = python
        self._procs: list[tuple[subprocess.Popen, Path]] = []
        self.job_port: int | None = None
        self.pool_ports: list[int] = []

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Starts the job service and the pools and waits until each listens; on any failure stops what started."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ)
        base["PATH"] = os.pathsep.join([os.path.dirname(self._python), base.get("PATH", "")])
        try:
            self.job_port = free_port()
            self._spawn([self._python, "-m", "bulkinfer.beam.local_cluster",
                         "--port", str(self.job_port), "--staging_dir", str(self._log_dir / "staging")],
                        base, None, "job_service.log", self.job_port)
            for k in range(self._pools):
                env = dict(base)
                for key, value in self._pool_env[k].items():
                    if value is None:
                        env.pop(key, None)
                    else:
                        env[key] = value
                port = free_port()
                self.pool_ports.append(port)
                self._spawn([self._python, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env, self._pool_cwd[k], f"pool-{k}.log", port)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], env: dict, cwd, log_name: str, port: int) -> None:
        log = self._log_dir / log_name
        with open(log, "wb") as out:
            # Its own session: stop() can reach the workers a pool started through the process group.
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append((proc, log))
        wait_for_port(port, proc, timeout_s=START_TIMEOUT_S, log=log)

    def stop(self) -> None:
        """Interrupts every process (a pool then stops its workers), waits, kills the process groups of
        those still alive, and reaps them all.  Safe to call twice."""
        procs, self._procs = self._procs, []
        for proc, _ in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc, _ in reversed(procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the process's own group: its SDK workers too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    # ---------------------------------------------------------------------------------------------- use
    @property
    def job_endpoint(self) -> str:
        return f"127.0.0.1:{self.job_port}"

    def pipeline_args(self, pool: int = 0, *, workers: int = 1) -> list[str]:
        """Beam options that send a job to this cluster, its SDK workers started by pool `pool`, `workers`
        worker processes per environment working at once (`--direct_num_workers`)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return ["--runner=PortableRunner", f"--job_endpoint={self.job_endpoint}", "--environment_type=EXTERNAL",
                f"--environment_config=127.0.0.1:{self.pool_ports[pool]}", f"--direct_num_workers={workers}"]

    def workers_started(self, pool: int) -> int:
        """How many SDK worker processes pool `pool` has started (from its log)."""
        return (self._log_dir / f"pool-{pool}.log").read_text(errors="replace").count("Starting worker with command")

    def submitted_pipelines(self) -> list:
        """The pipeline protos (beam_runner_api_pb2.Pipeline) of every job the job service received, oldest first."""
        import grpc
        from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

        with grpc.insecure_channel(self.job_endpoint) as channel:
            stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
            jobs = stub.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=30).job_info
            return [stub.GetPipeline(beam_job_api_pb2.GetJobPipelineRequest(job_id=j.job_id), timeout=30).pipeline
                    for j in jobs]


def resource_hints(pipeline_proto) -> dict[str, dict[str, str]]:
    """{transform's unique name: {hint URN: value}} for every leaf transform of a pipeline proto whose
    environment carries resource hints (how Beam submits `with_resource_hints`), e.g.
    {"BulkInference/Infer": {"beam:resources:accelerator:v1": "type:nvidia-h200;count:1", ...}}."""
    envs = pipeline_proto.components.environments
    hints = {}
    for t in pipeline_proto.components.transforms.values():
        env = envs.get(t.environment_id) if t.environment_id else None
        if env is not None and env.resource_hints and not t.subtransforms:
            hints[t.unique_name] = {urn: value.decode() for urn, value in env.resource_hints.items()}
    return hints


def serve_jobs(argv: Sequence[str] | None = None) -> None:
    """Runs Beam's local job service (`LocalJobServicer`) on --port until interrupted, each job on
    `--direct_num_workers` SDK workers per environment (from the job's own options; default 1).

    Beam's `local_job_service_main` runs every job on an FnApiRunner built with one worker per
    environment: `FnApiRunner.run_pipeline` reads --direct_num_workers, but the job service calls
    `run_via_runner_api`, which does not.  Here the runner is given the job's count, so its
    `ParallelBundleManager` splits each stage's input over that many workers and runs them at once,
    each an SDK worker process an external pool started (as Flink and Spark spread a stage over
    their task slots).
    """
    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class ParallelBeamJob(local_job_service.BeamJob):
        def _invoke_runner(self):
            self.set_state(beam_job_api_pb2.JobState.RUNNING)
            options = self.pipeline_options()
            runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
            # What run_pipeline sets from the same option (Beam 2.77 fn_runner.py); 0 means one per core there.
            count = int(options.view_as(DirectOptions).direct_num_workers)  # a string when it came as a job option
            runner._num_workers = count or os.cpu_count() or 1
            return runner.run_via_runner_api(self._pipeline_proto, options)

    parser = argparse.ArgumentParser(description="Beam's local job service, honouring --direct_num_workers")
    parser.add_argument("--port", type=int, default=0, help="port of the job API (default: any free one)")
    parser.add_argument("--staging_dir", help="where jobs' artifacts are staged")
    args = parser.parse_args(argv)
    servicer = local_job_service.LocalJobServicer(args.staging_dir, beam_job_type=ParallelBeamJob)
    port = servicer.start_grpc_server(args.port)
    print(f"Listening for beam jobs on port {port}.", flush=True)
    try:
        threading.Event().wait()  # until SIGINT (LocalCluster.stop)
    except KeyboardInterrupt:
        pass
    finally:
        servicer.stop()


class MeetingPoint(beam.DoFn):
    """A pass-through step that holds each worker process at its first element until `parties`
    different processes have reached it; a job that gets through had that many workers processing at once.

        rows | beam.ParDo(MeetingPoint(str(tmp_path / "met"), parties=2))

    directory: a local directory every worker can write (one file per arriving process, "host-pid").
    Raises TimeoutError in the worker (failing the bundle) when the others do not come within
    `timeout_s`: they were not running at the same time.  For tests of concurrency on `LocalCluster`.
    """

    def __init__(self, directory: str, *, parties: int = 2, timeout_s: float = 120.0):
        super().__init__()
        self.directory, self.parties, self.timeout_s = directory, parties, timeout_s

    def setup(self):
        self._met = False

    def process(self, element):
        if not self._met:
            self.arrive()
            self._met = True
        yield element

    def arrived(self) -> list[str]:
        """The processes ("host-pid") that reached the meeting point, sorted."""
        return sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []

    def arrive(self) -> None:
        """Marks this process arrived, then returns once `parties` processes have (polling the directory)."""
        os.makedirs(self.directory, exist_ok=True)
        open(os.path.join(self.directory, f"{socket.gethostname()}-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + self.timeout_s
        while len(self.arrived()) < self.parties:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.arrived()} of {self.parties} worker processes reached the meeting "
                                   f"point in {self.directory} within {self.timeout_s:.0f} s: they did not run at "
                                   "the same time")
            time.sleep(0.05)  # waiting for the other processes' files, with a deadline


if __name__ == "__main__":
    serve_jobs()
