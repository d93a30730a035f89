"""The answer from the measured costs (step 4 of `bulkinfer.tasks.plan`): predicted_seconds with its
tolerance, accelerator-hours, accelerators for a deadline, the cost, and the assumptions in words.
Pure arithmetic, tested apart from the measurement.

    >>> estimate(costs, rows=1_000_000, units=100, waves=2, spec=PlanSpec(deadline_s=600, price_per_hour=3.0))
"""

from __future__ import annotations

import dataclasses
import math
import re

from bulkinfer.tasks import run as job_run
from bulkinfer.tasks.plan.measuring import Costs

TOLERANCE = 0.3  # the stated relative error of predicted_seconds (see tests/tasks/test_plan.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """What to measure and what to answer.

    sample: rows of the input to run (fewer if the input has fewer).
    deadline_s: wall-clock seconds the job must finish in (None: no deadline).
    price_per_hour: price of one accelerator-hour, in the user's currency (None: no cost).
    accelerator: the accelerator type the job will run on, e.g. "nvidia-h200" (None: this machine's).
    rows_per_s: rows per second measured on that accelerator (e.g. a plan run there); without it the
      per-row time is this machine's.
    tolerance: the stated relative error of predicted_seconds.
    Raises ValueError for a sample < 1, a deadline <= 0, a negative price or rows_per_s <= 0.
    """

    sample: int = 2000
    deadline_s: float | None = None
    price_per_hour: float | None = None
    accelerator: str | None = None
    rows_per_s: float | None = None
    tolerance: float = TOLERANCE

    def __post_init__(self):
        if self.sample < 1:
            raise ValueError(f"sample must be >= 1 row, got {self.sample}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"the deadline must be > 0 seconds, got {self.deadline_s}")
        if self.price_per_hour is not None and not self.price_per_hour >= 0:
            raise ValueError(f"the price per hour must be >= 0, got {self.price_per_hour}")
        if self.rows_per_s is not None and not self.rows_per_s > 0:
            raise ValueError(f"rows_per_s must be > 0, got {self.rows_per_s}")


def parse_duration(text: str) -> float:
    """'90m', '2h', '1h30m', '1.5d', '45s' or '3600' (seconds) -> seconds.

    Raises ValueError naming the value, for anything else or a duration that is not > 0.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?", value)
    if not parts:
        raise ValueError(f"{text!r} is not a duration; write e.g. 45m, 2h, 1h30m, 1.5d or 5400 (seconds)")
    if value[-1].isdigit():
        seconds = float(value)
    else:
        seconds = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", value))
    if seconds <= 0:
        raise ValueError(f"{text!r}: the deadline must be longer than 0 seconds")
    return seconds


def estimate(costs: Costs, *, rows: int, units: int, waves: int, spec: PlanSpec) -> dict:
    """The answer from measured costs: predicted_seconds on this machine, accelerator-hours, accelerators
    for the deadline and cost.  Pure arithmetic (tested apart from the measurement).

    A job split over A accelerators: each pays the per-run cost and the model's load and compile once;
    rows, units and waves divide.  A = ceil(divisible / (deadline - per-accelerator fixed)), at most the
    number of units (a unit runs on one worker; `deadline_problem` says so when that is not enough).
    """
    predicted = costs.seconds(rows=rows, units=units, waves=waves)
    per_row = costs.per_row_s if spec.rows_per_s is None else 1.0 / spec.rows_per_s
    fixed = costs.per_run_s + costs.load_compile_s  # once per accelerator (worker)
    divisible = rows * per_row + units * costs.per_unit_s + waves * costs.per_wave_s
    answer = {
        "predicted_seconds": round(predicted, 1),
        "tolerance": spec.tolerance,
        "predicted_range_seconds": [round(predicted * (1 - spec.tolerance), 1),
                                    round(predicted * (1 + spec.tolerance), 1)],
        "accelerator_hours": round((fixed + divisible) / 3600, 4),
        "deadline_seconds": spec.deadline_s,
        "accelerators_needed": 1,
        "wall_seconds_with_accelerators": round(fixed + divisible, 1),
        "price_per_hour": spec.price_per_hour,
        "cost": None,
    }
    if spec.deadline_s is not None:
        if spec.deadline_s <= fixed:
            answer["accelerators_needed"] = None
            answer["wall_seconds_with_accelerators"] = None
            answer["deadline_problem"] = (
                f"the deadline ({spec.deadline_s:g} s) is not longer than what each accelerator pays before "
                f"its first row ({fixed:.1f} s: model load and compile, pipeline start); no number of "
                "accelerators meets it")
        else:
            needed = max(1, math.ceil(divisible / (spec.deadline_s - fixed) - 1e-9))
            if needed > units:  # a unit of work runs on one worker: the job splits no finer than its units
                needed = units
                answer["deadline_problem"] = (
                    f"the job has {units} unit(s) of work, and one accelerator each ends after about "
                    f"{fixed + divisible / units:.1f} s, past the deadline ({spec.deadline_s:g} s); a smaller "
                    "--unit-size splits large files into more units")
            answer["accelerators_needed"] = needed
            answer["wall_seconds_with_accelerators"] = round(fixed + divisible / needed, 1)
            answer["accelerator_hours"] = round((needed * fixed + divisible) / 3600, 4)
    if spec.price_per_hour is not None:
        answer["cost"] = round(answer["accelerator_hours"] * spec.price_per_hour, 2)
    return answer


def assumptions(costs: Costs, *, rows: int, files: int, spec: PlanSpec, job: job_run.JobSpec) -> list[str]:
    """The plan's assumptions, in words, for the report."""
    said = [
        f"measured on this machine ({costs.device}) with Beam's embedded FnApiRunner: {costs.sample_rows:,} "
        f"sampled rows of {rows:,} ({costs.sample_failed} of them failed), spread over {files} file(s), run "
        "through the job itself",
        f"per-row time {costs.per_row_s * 1000:.3f} ms on this machine ("
        + (f"{1 / costs.per_row_s:,.0f} rows/s" if costs.per_row_s else "too small to measure") + ")",
        f"fixed costs on this machine: {costs.load_compile_s:.2f} s model load and compile in a fresh process "
        f"({costs.compiles} batch shapes, compiled or loaded from the compilation cache this plan filled), {costs.per_run_s:.2f} s "
        f"per run, {costs.per_wave_s:.2f} s per wave of up to {job.wave_units} units, "
        f"{costs.per_unit_s * 1000:.1f} ms per unit of work",
        "predicted_seconds: the wall time of the whole job on this machine (tasks.run.run; `bulkinfer run` "
        "adds its process start), into an empty output directory; a resumed run does less",
        f"tolerance: +-{spec.tolerance:.0%}; other work on the machine, or a job whose rows differ from the "
        "sample (longer texts, more failures), moves the real figure",
    ]
    if spec.rows_per_s is not None:
        target = spec.accelerator or "the target accelerator"
        said.append(f"accelerator-hours, accelerators needed and cost use {spec.rows_per_s:g} rows/s on {target} "
                    f"(--rows-per-s, given, not measured here); fixed costs are still this machine's")
    elif spec.accelerator is not None and same_device(spec.accelerator, costs.device):
        said.append(f"--accelerator {spec.accelerator}: this machine's device ({costs.device}), so every figure "
                    "was measured on it")
    elif spec.accelerator is not None:
        said.append(f"--accelerator {spec.accelerator}: the per-row time and fixed costs are this machine's "
                    f"({costs.device}), not {spec.accelerator}'s; no speed-up is assumed.  Run `bulkinfer plan` on "
                    f"a {spec.accelerator} machine, or pass --rows-per-s measured there")
    return said


def same_device(accelerator: str, device: str) -> bool:
    """Whether an --accelerator value ("nvidia-h200", or a resource hint "type:nvidia-h200;count:1") names
    the device kind of `device` ("gpu: 1 x NVIDIA H200"), ignoring case and punctuation."""
    kind = accelerator.split("type:", 1)[1].split(";", 1)[0] if "type:" in accelerator else accelerator
    kind = re.sub(r"[^a-z0-9]", "", kind.lower())
    return bool(kind) and kind == re.sub(r"[^a-z0-9]", "", device.rsplit(" x ", 1)[-1].lower())
