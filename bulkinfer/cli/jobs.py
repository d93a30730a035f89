"""From parsed flags to what the tasks take: the model (local or served), the JobSpec, and a finished
run's exit status."""

from __future__ import annotations

import contextlib
import os
import sys

from bulkinfer.cli.args import _compilation_cache


def _model(args):
    """The model spec for --model and the engine flags; text-only flags on another model are an error."""
    from bulkinfer.models.registry import BUILTIN_FUNCTIONS
    from bulkinfer.models.resolve import model_spec

    settings = dict(warmup=args.warmup, compilation_cache_dir=_compilation_cache(args.compilation_cache))
    if args.max_in_flight is not None:  # text and JAX models; a decoder LM refuses it by name
        settings["max_in_flight"] = args.max_in_flight
    text_only = {"--dtype": ("dtype", args.dtype if args.dtype != "float32" else None),
                 "--max-length": ("max_length", args.max_length),
                 "--token-budget": ("bucketing", args.token_budget and _budget_bucketing(args.token_budget)),
                 "--packing": ("packed", {"auto": None, "on": True, "off": False}[args.packing])}
    given = {flag: kv for flag, kv in text_only.items() if kv[1] is not None}
    if args.model in BUILTIN_FUNCTIONS and given:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to text models only, "
                         f"not to {args.model!r}")
    settings.update(dict(given.values()))
    return model_spec(args.model, **settings)


def _budget_bucketing(token_budget: int):
    """The default length ladder cut at --token-budget (the model's max length caps it again at load)."""
    from bulkinfer.runtime import DEFAULT_LENGTHS, Bucketing

    return Bucketing(token_budget=token_budget,
                     lengths=tuple(n for n in DEFAULT_LENGTHS if n < token_budget) + (token_budget,))


def _job_model(args):
    """The model a job's flags name: a RemoteModel with --server (checked to be served), else the local spec."""
    if args.server:
        local_only = [f for f, v in (("--max-length", args.max_length), ("--token-budget", args.token_budget),
                                     ("--warmup", args.warmup), ("--compilation-cache", args.compilation_cache),
                                     ("--dtype", args.dtype != "float32"), ("--packing", args.packing != "auto"),
                                     ("--max-in-flight", args.max_in_flight is not None),
                                     ("--processes-per-accelerator", args.processes_per_accelerator)) if v]
        if local_only:
            verb = "configures the local engine and does" if len(local_only) == 1 else "configure the local engine and do"
            raise ValueError(f"{', '.join(local_only)} {verb} not apply with --server; "
                             "pass them to `bulkinfer serve` instead")
        from bulkinfer.serve.remote_model import RemoteModel, RetryPolicy

        retry = RetryPolicy() if args.server_retry_budget_s is None else RetryPolicy(
            budget_s=args.server_retry_budget_s)
        model = RemoteModel.for_model(args.server, args.model, retry=retry,
                                      token=args.server_token or os.environ.get("BULKINFER_TOKEN"))
        _check_served(model)
        return model
    if args.server_token:
        raise ValueError("--server-token needs --server URL")
    if args.server_retry_budget_s is not None:
        raise ValueError("--server-retry-budget-s needs --server URL")
    return _prediction_model(args)


def _prediction_model(args):
    """`_model`, refusing a decoder LM: it generates text (`bulkinfer generate`), it does not predict."""
    from bulkinfer.models.lm import LanguageModel

    model = _model(args)
    if isinstance(model, LanguageModel):
        raise ValueError(f"{args.model!r} is a decoder language model: generate text with `bulkinfer generate "
                         f"--model {args.model} ...`; `bulkinfer {args.command}` takes embedders and classifiers")
    return model


def _job_spec(args, *, output: str | None = None, keep_fields: tuple[str, ...] = ()):
    """The JobSpec of a job's flags (`_job_args`); output: another directory than --output (e.g. DIR/predictions)."""
    from bulkinfer.tasks.run import JobSpec

    return JobSpec(input=args.input, output=output or args.output, format=args.format, id_field=args.id_field,
                   input_field=args.input_field, keep_fields=keep_fields, overwrite=args.overwrite,
                   wave_units=args.wave_units, max_failed_fraction=args.max_failed_fraction,
                   allow_missing_ids=args.allow_missing_ids, accelerator=args.accelerator,
                   min_ram=args.min_ram, processes_per_accelerator=args.processes_per_accelerator,
                   **({} if args.unit_size is None else {"unit_size": args.unit_size}))


class JobExit(Exception):
    """A command ends with this exit status; its error line is already on stderr (`main` returns it)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@contextlib.contextmanager
def _job_errors(prefix: str = "bulkinfer", *, settings_prefix: str | None = None, failed: tuple = ()):
    """Turns a job's errors into one line on stderr and a JobExit: 1 when the job ran and failed (JobFailed,
    or one of `failed`), 2 for settings, inputs or a checkpoint it cannot use.  The line reads
    "{prefix}: error: ..." (settings_prefix, if given, for the second kind)."""
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks.run import JobFailed

    try:
        yield
    except (JobFailed, *failed) as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        raise JobExit(1) from None
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"{settings_prefix or prefix}: error: {e}", file=sys.stderr)
        raise JobExit(2) from None


def _keep_fields(args) -> tuple[str, ...]:
    """--keep-fields A,B as a tuple of names."""
    return tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())


def _exit_status(report: dict, output: str) -> int:
    """A finished run's exit status: 1 (with the reason) when its counts do not reconcile, units are left, or
    no row succeeded."""
    if not report["reconciled"]:
        print(f"bulkinfer: error: rows_in {report['rows_in']} != rows_out {report['rows_out']} + rows_failed "
              f"{report['rows_failed']}; see {output}/report.json", file=sys.stderr)
        return 1
    if report["units_done"] != report["units"]:
        print(f"bulkinfer: error: only {report['units_done']} of {report['units']} units of work were committed; "
              "rerun the same command to finish them", file=sys.stderr)
        return 1
    if report["rows_in"] and not report["rows_out"]:  # a small job (under the failure limit's minimum) that did nothing
        print(f"bulkinfer: error: every one of the {report['rows_in']} rows failed; their errors are in "
              f"{output}/failed-*.jsonl (a wrong input field?)", file=sys.stderr)
        return 1
    return 0


def _served(args):
    """The model spec to serve: a decoder LM is served as a generator (v2: prompt BYTES in, completion
    BYTES out, sampling settings as request parameters, keyed by the prompt's text)."""
    from bulkinfer.models.lm import LanguageModel

    spec = _model(args)
    if isinstance(spec, LanguageModel):
        from bulkinfer.tasks import generate

        return generate.generator(spec, id_field=None, warmup=args.warmup)
    return spec


def _check_served(model) -> None:
    """Raises ValueError when the server answers that it does not serve the model or refuses the token;
    a server that cannot be reached now is left to the job's retry budget."""
    from bulkinfer.serve.v2_client import RemoteError, V2Client

    try:
        V2Client(model.url, token=model.token, timeout_s=30).model_metadata(model.name)
    except RemoteError as e:
        if e.status in (401, 403, 404):
            raise ValueError(f"{model.url} refuses model {model.name!r} ({e}); check --model and --server-token "
                             "against what `bulkinfer serve` was started with") from None
    except OSError:
        pass
