"""`bulkinfer`: the command line.  It parses arguments and calls one library function per command; each
command (its help epilog, its flags and its handler) is a module of this package."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading

from bulkinfer import __version__
from bulkinfer.cli.args import _beam_flags_error
from bulkinfer.cli.distill import _distill, _distill_parser
from bulkinfer.cli.evaluate import _eval, _eval_parser
from bulkinfer.cli.generate import _generate, _generate_parser
from bulkinfer.cli.jobs import JobExit
from bulkinfer.cli.plan import _plan, _plan_parser
from bulkinfer.cli.run import _run, _run_parser
from bulkinfer.cli.serve import _serve, _serve_parser
from bulkinfer.cli.stats import _stats, _stats_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulkinfer", description="Bulk (offline) ML inference on Apache Beam.")
    parser.add_argument("--version", action="version", version=f"bulkinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {"run": _run_parser(sub), "eval": _eval_parser(sub), "serve": _serve_parser(sub),
                       "distill": _distill_parser(sub), "stats": _stats_parser(sub), "plan": _plan_parser(sub),
                       "generate": _generate_parser(sub)}
    return parser


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def _on_sigint(signum, frame):
    """The command's Ctrl-C: the first raises KeyboardInterrupt (the job stops, waits for its running
    batches and says what it kept); a second one during that clean-up or the exit leaves at once, with
    status 130 (raising again there could interrupt native code's clean-up, which aborts the process)."""
    if _on_sigint.seen:
        os.write(2, b"\nbulkinfer: interrupted again; stopping now\n")
        os._exit(INTERRUPTED)
    _on_sigint.seen = True
    signal.default_int_handler(signum, frame)


_on_sigint.seen = False
_on_sigint.bulkinfer_interruptible = True  # tasks.interrupt.interruptible chains it


def main(argv: list[str] | None = None) -> int:
    ours = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if ours:
        _on_sigint.seen = False
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    except JobExit as e:  # its error line is already on stderr
        return e.status
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; a job's text says what it kept
        print(f"bulkinfer: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
        return INTERRUPTED
    finally:
        if ours and not _on_sigint.seen:  # after a Ctrl-C the handler stays, for a second one during exit
            signal.signal(signal.SIGINT, signal.default_int_handler)


def entry() -> None:
    """The `bulkinfer` console script and `python -m bulkinfer.cli`: `main()`, then exit with its status.

    Before exiting it freezes the garbage collector's objects (`gc.freeze`): the interpreter's last
    collection at exit would otherwise walk the millions of objects Beam and JAX leave behind, about
    0.4 s of one core after a MiniLM job (RUNTIME.md section 10).  Frozen reference cycles are not
    collected, so their finalizers do not run; the operating system takes back the memory, and
    atexit handlers run as before."""
    status = main()
    gc.freeze()
    sys.exit(status)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    jobs = {"run": _run, "eval": _eval, "stats": _stats, "distill": _distill, "generate": _generate}
    if args.command in jobs:  # the flags these do not take are Beam pipeline options
        if _beam_flags_error(args.command, beam_args, parser.commands[args.command]):
            return 2
        return jobs[args.command](args, beam_args)
    if args.command == "serve":
        if beam_args:
            print(f"bulkinfer serve: error: unrecognized arguments: {' '.join(beam_args)}", file=sys.stderr)
            return 2
        logging.getLogger("bulkinfer").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        return _serve(args)
    if args.command == "plan":
        if beam_args:
            why = ("quote the --input glob ('data/*.jsonl') so that the shell does not expand it into file names"
                   if not beam_args[0].startswith("-") else
                   "the plan measures on this machine with Beam's embedded runner; Beam options do not apply")
            print(f"bulkinfer plan: error: unrecognized arguments: {' '.join(beam_args)}; {why}", file=sys.stderr)
            return 2
        return _plan(args)
    return 2
