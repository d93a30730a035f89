"""The flags several commands share (model and job argument groups), the argument types, and the
check that the flags a job's parser did not take are Beam pipeline options."""

from __future__ import annotations

import argparse
import os
import sys


def _job_args(p: argparse.ArgumentParser, *, formats: tuple[str, ...] = ("parquet", "jsonl")) -> None:
    """The flags every file-to-file job shares (run, eval, stats, distill): the model and its engine,
    input, output, id and input fields, output format, resume, remote server, resource hints, units of
    work and the failure limit.  `_job_model` and `_job_spec` turn them into a model and a JobSpec."""
    _model_args(p)
    p.add_argument("--input", required=True, metavar="GLOB",
                   help="input files: .jsonl (.json, .ndjson), .parquet or .csv, on any Beam filesystem (quote the glob)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--id-field", default="id", help="row field copied to the output as the row's id (default: id)")
    p.add_argument("--input-field", "--text-field", dest="input_field", default=None, metavar="FIELD",
                   help="row field the model reads, for a model with one input (default: the input's name: "
                        "text for text models, pixels for digits); --text-field is the old name")
    p.add_argument("--format", default="parquet", choices=list(formats), help="output format (default: parquet)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch: delete an earlier run's outputs in DIR (default: resume it)")
    p.add_argument("--server", metavar="URL", default=None,
                   help="run the model on this Open Inference Protocol (v2) server, e.g. http://127.0.0.1:8000 "
                        "(bulkinfer serve, Triton, ...) instead of in this job; the engine flags then do not apply")
    p.add_argument("--server-token", metavar="TOKEN", default=None,
                   help="bearer token for --server (default: $BULKINFER_TOKEN)")
    p.add_argument("--server-retry-budget-s", type=float, default=None, metavar="S",
                   help="seconds one request to --server may spend retrying before the job stops (default: 120)")
    p.add_argument("--accelerator", default=None, metavar="HINT",
                   help="Beam resource hint for the inference stage, e.g. 'type:nvidia-h200;count:1;"
                        "install-nvidia-driver' (runners that honour hints place the stage on such workers)")
    p.add_argument("--min-ram", default=None, metavar="SIZE", help="Beam resource hint for the inference stage, e.g. 16GB")
    p.add_argument("--processes-per-accelerator", type=int, default=None, metavar="N",
                   help="SDK worker processes sharing each GPU on a worker: each preallocates 0.9/N of its memory "
                        "(XLA_PYTHON_CLIENT_MEM_FRACTION, unless the worker's environment sets it) "
                        "(default: the worker's $BULKINFER_PROCESSES_PER_ACCELERATOR, else 1: JAX's 75%%)")
    p.add_argument("--unit-size", type=_size, default=None, metavar="BYTES",
                   help="split input files larger than this into units of work of about this size "
                        "(e.g. 64MiB, the default; 512KiB); a resumed job redoes only unfinished units")
    p.add_argument("--wave-units", type=int, default=64, metavar="N",
                   help="units of work per pipeline run; a crash loses at most the wave in flight (default: 64)")
    p.add_argument("--max-failed-fraction", type=float, default=0.5, metavar="F",
                   help="stop the job (exit 1, nothing more committed) when more than this fraction of its rows "
                        "fail, once 1000 rows were seen (default: 0.5; 1 never stops)")
    p.add_argument("--allow-missing-ids", action="store_true",
                   help="predict rows whose id field is missing or null (default: each is a dead letter)")
    p.add_argument("-v", "--verbose", action="store_true", help="log Beam's and bulkinfer's progress")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a built-in model name (minilm: all-MiniLM-L6-v2 text embeddings; digits: an 8x8 "
                        "handwritten-digit classifier) or a sentence-transformers/HF text-encoder directory "
                        "on any Beam filesystem")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of a text model's weights and activations (default: float32; bfloat16 "
                        "halves the weights' memory and moves the outputs slightly)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the model's max_seq_length)")
    p.add_argument("--token-budget", type=_positive(int), default=None,
                   help="tokens per device batch: rows x padded length, or tokens end to end when packed "
                        "(default: 1024 on the CPU, 2048 on an accelerator: Bucketing.for_platform)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="padding-free batches for text models: rows' tokens end to end, so the token-wise layers "
                        "compute no padding (default auto: on when the engine runs on the CPU and splits no batch "
                        "over devices; outputs equal padded ones to float32 rounding; RUNTIME.md section 9)")
    p.add_argument("--max-in-flight", type=_positive(int, allow_zero=True), default=None, metavar="N",
                   help="batches the engine dispatches ahead of the one it waits for, each on a thread of its "
                        "own; on the CPU they compute at once and keep every core busy (default 2; 0: one "
                        "batch at a time; RUNTIME.md section 2)")
    p.add_argument("--warmup", action="store_true", help="compile every batch shape before taking data")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="persistent XLA compilation cache, shared across runs and processes, so each batch "
                        "shape compiles once per machine; a path every worker can use (local or gs://...) "
                        "(default: each worker's own $JAX_COMPILATION_CACHE_DIR, $XDG_CACHE_HOME/bulkinfer/xla "
                        "or ~/.cache/bulkinfer/xla; 'none' turns it off).  In a local directory a text "
                        "model keeps its compiled executables in DIR/bulkinfer-executables, so a warm process "
                        "skips tracing too; they are unpickled when loaded, so keep DIR private")


def _duration(value: str) -> float:
    from bulkinfer.tasks.plan import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind, *, allow_zero: bool = False):
    """An argparse type: a number of `kind` > 0 (>= 0 with allow_zero), or a message naming the value."""
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not (number >= 0 if allow_zero else number > 0) or number != number:
            raise argparse.ArgumentTypeError(f"{value!r} must be {'>= 0' if allow_zero else '> 0'}")
        return number

    return parse


def _size(value: str) -> int:
    """'65536', '512KiB', '64MiB', '1GiB' (or KB/MB/GB, also powers of 1024) -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size; write e.g. 65536, 512KiB or 64MiB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: the size must be at least 1 byte")
    return size


def _compilation_cache(value: str | None) -> str | None:
    """The spec's compilation_cache_dir: a named path, None for 'none', else each worker's own default
    (resolved on the worker, never the launcher's home: see bulkinfer.runtime.process)."""
    from bulkinfer.runtime.process import WORKER_LOCAL

    if value is not None:
        if value.lower() == "none":
            return None
        return value if "://" in value else os.path.abspath(value)  # a relative path means the launcher's
    return WORKER_LOCAL


def _beam_flags_error(command: str, beam_args: list[str], command_parser: argparse.ArgumentParser) -> bool:
    """Prints one error line and returns True when `beam_args` (the flags a job's parser did not take)
    hold flags that are not Beam pipeline options, with a hint for our own flags misspelt with '_' and
    for an unquoted --input glob that the shell expanded; command_parser: that command's subparser."""
    unknown = _unknown_beam_flags(beam_args)
    if not unknown:
        return False
    ours = {o for a in command_parser._actions for o in a.option_strings}
    hints = [f"{u} (did you mean {u.replace('_', '-')}?)" if u.replace("_", "-") in ours else u for u in unknown]
    stray = [u for u in unknown if not u.startswith("-")]
    why = "flags that are not bulkinfer's must be Beam pipeline options" if len(stray) < len(unknown) else ""
    if stray:  # most often the shell expanded an unquoted --input glob into many file names
        why = "; ".join(filter(None, [why, "quote the --input glob ('data/*.jsonl') so that the shell "
                                           "does not expand it into file names"]))
    print(f"bulkinfer {command}: error: unrecognized arguments: {', '.join(hints)}; {why}", file=sys.stderr)
    return True


def _unknown_beam_flags(beam_args: list[str]) -> list[str]:
    """The flags in beam_args that no Beam PipelineOptions class defines (Beam itself only logs them)."""
    if not beam_args:  # the common case: skips importing Beam's options and building their parser (~0.5 s)
        return []
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen, stack = set(), [PipelineOptions]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                try:
                    sub._add_argparse_args(parser)
                except argparse.ArgumentError:
                    pass  # an option two classes both define
    _, unknown = parser.parse_known_args(beam_args)
    return [u.split("=", 1)[0] if u.startswith("--") else u for u in unknown]
