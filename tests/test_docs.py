"""The documented `bulkinfer run` commands for Dataflow, Flink and Spark build their pipelines (none is submitted).

Each command in a fenced bash block of docs/*.md is parsed by the CLI's own parser; every flag that is
not bulkinfer's must be a Beam pipeline option; the job's pipeline is built with those options and
turned into its proto (what a runner would receive), which must carry the documented resource hints.
A model given as a URL (gs://...) is built from the built-in minilm instead: the test has no bucket.
"""

import re
import shlex
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from bulkinfer import cli
from bulkinfer.beam.local_cluster import resource_hints
from bulkinfer.beam.units import Unit
from bulkinfer.cli.args import _unknown_beam_flags
from bulkinfer.cli.jobs import _model
from bulkinfer.tasks import run as job

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("dataflow.md", "flink.md", "spark.md")
ACCELERATOR_URN = "beam:resources:accelerator:v1"
MIN_RAM_URN = "beam:resources:min_ram_bytes:v1"


def commands(page: str) -> list[str]:
    """The `bulkinfer run ...` commands in the page's ```bash blocks, continuation lines joined."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("bulkinfer run "):
                found.append(line.strip())
    return found


DOCUMENTED = [(page, cmd) for page in PAGES for cmd in commands(page)]


def test_every_page_documents_commands_and_the_readme_links_the_pages():
    counts = {page: len(commands(page)) for page in PAGES}
    assert counts["dataflow.md"] >= 3 and counts["flink.md"] >= 2 and counts["spark.md"] >= 2, counts
    dataflow = (ROOT / "docs" / "dataflow.md").read_text()
    for needed in ("--number_of_worker_harness_threads", "no_use_multiple_sdk_containers", "--sdk_container_image",
                   "FROM apache/beam_python", "tpu", "nvidia"):
        assert needed in dataflow, needed
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{page}" in readme for page in PAGES)


def _build(argv: list[str]):
    """(parsed args, pipeline options, pipeline proto) for `bulkinfer run` argv, as cli.run._run builds the job."""
    args, beam_args = cli._parser().parse_known_args(argv)
    assert _unknown_beam_flags(beam_args) == [], f"not Beam options: {_unknown_beam_flags(beam_args)}"
    if "://" in args.model:
        args.model = "minilm"
    model = _model(args)
    keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
    spec = job.JobSpec(input=args.input, output=args.output, format=args.format, id_field=args.id_field,
                       input_field=args.input_field, keep_fields=keep, wave_units=args.wave_units,
                       accelerator=args.accelerator, min_ram=args.min_ram,
                       processes_per_accelerator=args.processes_per_accelerator)
    options = PipelineOptions(beam_args)
    p = beam.Pipeline(runner=FnApiRunner(), options=options)  # built, never run
    job.build(p, model, spec, [Unit(source=args.input.replace("*", "part-0"))])
    return args, options, p.to_runner_api()


@pytest.mark.parametrize("page, command", DOCUMENTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(DOCUMENTED)])
def test_documented_command_builds_its_pipeline(page, command):
    argv = shlex.split(command)[1:]  # without "bulkinfer"
    assert argv[0] == "run"
    args, options, proto = _build(argv)
    standard = options.view_as(StandardOptions)
    assert standard.runner in ("DataflowRunner", "PortableRunner"), standard.runner
    if standard.runner == "PortableRunner":
        portable = options.view_as(PortableOptions)
        assert portable.job_endpoint and portable.environment_type in ("EXTERNAL", "DOCKER", "PROCESS")
        assert portable.environment_config
    else:
        assert options.view_as(WorkerOptions).sdk_container_image, "Dataflow needs a container with JAX"
        assert args.accelerator, "a Dataflow command here is an accelerator job"
        single = "no_use_multiple_sdk_containers" in (options.view_as(DebugOptions).experiments or [])
        # Several SDK processes on one GPU only with each one's share of its memory.
        assert single or args.processes_per_accelerator, "one SDK process per VM, or --processes-per-accelerator"
        if "tpu" in args.accelerator:
            assert single and not args.processes_per_accelerator, "a TPU chip belongs to one process"
    hints = resource_hints(proto)
    inference = {name: h for name, h in hints.items() if "BulkInference/Infer" in name}
    if args.accelerator or args.min_ram:
        assert inference and set(hints) == set(inference), hints  # the inference stage only
        for h in inference.values():
            assert h.get(ACCELERATOR_URN) == args.accelerator
            if args.min_ram:
                assert int(h[MIN_RAM_URN]) == int(args.min_ram.removesuffix("GB")) * 10**9
    else:
        assert not hints
