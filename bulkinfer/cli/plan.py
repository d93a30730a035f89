"""`bulkinfer plan`: size a job (rows, time on this machine, accelerators for a deadline, cost)."""

from __future__ import annotations

import argparse
import json

from bulkinfer.cli.args import _duration, _model_args, _positive, _size
from bulkinfer.cli.jobs import _job_errors, _keep_fields, _prediction_model

EPILOG_PLAN = """\
What it does: counts the rows (Parquet footers; JSONL and CSV by a scan for lines), copies a sample of
--sample rows spread evenly over the files, runs the job on it several times on this machine (the same
path as `bulkinfer run`: model load, compile, tokenization, bucketing, the engine, writing, commits) and
fits the run's wall time to  per-run + load-and-compile + waves x per-wave + units x per-unit + rows x
per-row.  It prints predicted_seconds for this machine running the whole job with its tolerance, the
accelerator-hours, the accelerators needed to meet --deadline, the cost at --price-per-hour, and the
assumptions.  The first plan on a machine also fills the compilation cache with every batch shape.

--accelerator names another device than this machine's: the per-row time stays this machine's (no
speed-up is assumed) unless --rows-per-s gives the rate measured there.

Exit status: 0 planned; 1 the sample's run failed (as the job would); 2 bad flags or settings.

Examples:
  bulkinfer plan --model minilm --input 'data/*.parquet'
  bulkinfer plan --model minilm --input 'data/*.jsonl' --deadline 2h --price-per-hour 3.2 --json
  bulkinfer plan --model minilm --input 'data/*.jsonl' --accelerator nvidia-h200 --rows-per-s 40000 \\
      --deadline 30m --price-per-hour 10
"""


def _plan_parser(sub) -> argparse.ArgumentParser:
    plan = sub.add_parser(
        "plan", help="size a job: rows, time on this machine, accelerators for a deadline, cost",
        description="Count the input's rows, run a sample of them through the job on this machine, and "
                    "predict the whole job's time, the accelerators a deadline needs and the cost.",
        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(plan)
    plan.add_argument("--input", required=True, metavar="GLOB",
                      help="the job's input files, as for `bulkinfer run` (quote the glob)")
    plan.add_argument("--sample", type=_positive(int), default=2000, metavar="N",
                      help="rows of the input to run, spread over the files (default: 2000)")
    plan.add_argument("--accelerator", default=None, metavar="TYPE",
                      help="the accelerator the job will run on, e.g. nvidia-h200; without --rows-per-s the "
                           "per-row time stays this machine's, and the report says so")
    plan.add_argument("--rows-per-s", type=_positive(float), default=None, metavar="R",
                      help="rows per second measured on --accelerator (e.g. by `bulkinfer plan` there), for "
                           "the accelerator-hours, the accelerators needed and the cost")
    plan.add_argument("--deadline", type=_duration, default=None, metavar="DURATION",
                      help="wall time the job must finish in, e.g. 45m, 2h, 1h30m, 1.5d or 5400 (seconds)")
    plan.add_argument("--price-per-hour", type=_positive(float, allow_zero=True), default=None, metavar="P",
                      help="price of one accelerator-hour, for the cost")
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    for flag, kwargs in (("--id-field", dict(default="id")), ("--input-field", dict(default=None)),
                         ("--keep-fields", dict(default="")),
                         ("--format", dict(default="parquet", choices=["parquet", "jsonl"])),
                         ("--unit-size", dict(type=_size, default=None)),
                         ("--wave-units", dict(type=_positive(int), default=64))):
        plan.add_argument(flag, help=f"as for `bulkinfer run` {flag}", **kwargs)
    plan.add_argument("-v", "--verbose", action="store_true", help="log Beam's and bulkinfer's progress")
    return plan


def _plan(args) -> int:
    from bulkinfer.tasks import plan
    from bulkinfer.tasks import run as job

    with _job_errors("bulkinfer plan"):
        spec = job.JobSpec(input=args.input, output="", format=args.format, id_field=args.id_field,
                           input_field=args.input_field, keep_fields=_keep_fields(args), wave_units=args.wave_units,
                           **({} if args.unit_size is None else {"unit_size": args.unit_size}))
        settings = plan.PlanSpec(sample=args.sample, deadline_s=args.deadline, price_per_hour=args.price_per_hour,
                                 accelerator=args.accelerator, rows_per_s=args.rows_per_s)
        report = plan.plan(_prediction_model(args), spec, settings)
    print(json.dumps(report, indent=2) if args.json else plan.summary(report))
    return 0
