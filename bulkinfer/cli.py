"""`bulkinfer`: the command line.  It parses arguments and calls one library function per command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EPILOG_RUN = """\
Any flag not listed above is a Beam pipeline option, passed through unchanged, e.g.
  --runner=PortableRunner --job_endpoint=localhost:8099 --environment_type=EXTERNAL ...
  --direct_num_workers=2 --direct_running_mode=multi_processing
Without --runner the job runs on Beam's embedded FnApiRunner in this process.

Units of work: each input file, or for files over --unit-size (JSONL byte ranges cut at newlines,
Parquet row groups; CSV is never split) a range of one.  A unit is committed (DIR/_committed/) only
when its rows_in = rows_out + rows_failed; otherwise the job fails and nothing of it is committed.
Units run in waves of --wave-units, one Beam pipeline each.

Rerunning the same command after an interruption resumes: committed units are skipped, units whose
input file changed since (size or modification time) are redone with their old outputs replaced,
and report.json counts units_skipped, units_resumed and units_reprocessed.

Bad rows vs outages: a row that cannot be read, lacks its input or id (or has the wrong type, shape or
dtype), or on which the model fails
(isolated by bisection) is a dead letter in failed-*.jsonl.  A server down past --server-retry-budget-s
or a failed device is not the rows' fault: the job stops with exit 1, those rows are not committed,
and rerunning the same command later does them.  The job also stops with exit 1 when more than
--max-failed-fraction of its rows fail (checked once 1000 rows were seen, or when all of at least 100
rows failed): a systemic fault.

Exit status: 0 done; 1 the job failed or is incomplete (rerun to resume); 2 bad flags or settings.

Outputs in DIR:
  part-*.parquet (or .jsonl)  one row per input row that succeeded: the id field, --keep-fields and the
                              model's outputs (embedding; label and probs for digits)
  failed-*.jsonl              one row per input row that failed: id, stage, error, raw record
  report.json                 rows_in = rows_out + rows_failed, rows/s, padding, compiles, ...

Examples:
  bulkinfer run --model minilm --input 'data/sample/*.jsonl' --output out/demo
  bulkinfer run --model minilm --server http://127.0.0.1:8000 --input 'data/sample/*.jsonl' --output out/remote
  bulkinfer run --model digits --input 'digits/*.parquet' --output out/digits --keep-fields target
"""

EPILOG_DISTILL = """\
Any flag not listed above is a Beam pipeline option (see `bulkinfer run --help`).

Per row, keyed by --id-field: a classifier (an output --probs-field of softmax probabilities [C]) gives
top_k_indices int32 [K] (most probable first), top_k_logprobs float32 [K] = log_softmax(log(p) / T),
which equals log_softmax(logits / T), and rest_mass float32, the probability at T outside the top K
(rest_mass + sum(exp(top_k_logprobs)) = 1); an embedder (output --embedding-field) gives its embedding.
The model's other outputs and --keep-fields are kept.

Outputs in DIR:
  shards/shard-*.parquet | .array_record   the rows, in input order (ArrayRecord: one msgpack map per
                                           row; vectors as raw little-endian bytes)
  manifest.json       teacher name and digests, kind, top_k, temperature, schema, shards with rows,
                      bytes and sha256
  COMPLETED           written last; until it exists the shards are not final
  predictions/        the teacher run: dead letters (failed-*.jsonl), report.json
                      (rows_in = rows_out + rows_failed), committed units

An interrupted run resumes when the same command is run again; once COMPLETED, the same command does
nothing, and other settings or changed inputs are refused unless --overwrite.

Exit status: 0 done; 1 the job failed or is incomplete (rerun to resume); 2 bad flags or settings.

Examples:
  bulkinfer distill --model digits --input 'data/digits/test-*.jsonl' --output out/teacher --top-k 3 --temperature 2
  bulkinfer distill --model minilm --input 'data/sample/*.jsonl' --output out/emb --format array_record
"""

EPILOG_EVAL = """\
Runs the model over the input as `bulkinfer run` does, into DIR/predictions/ (resumable: rerun the same
command after an interruption), keeping --label-field and --slice-field, then evaluates the predictions
in one more Beam pipeline whose combiners give the same numbers for any sharding or worker count.
Any flag not listed above is a Beam pipeline option for both pipelines (see bulkinfer run --help).

A classifier has a probabilities output (--probs-field, default probs: softmax over C classes; the true
class is an integer 0..C-1, or a name from --class-names).  An embedder (output --embedding-field, e.g.
minilm) is evaluated as a zero-shot classifier: --class-names are embedded by the same model and
probs = softmax(20 * cosine(text, class name)), the scale of sentence-transformers'
MultipleNegativesRankingLoss.  A label field named like a model output (digits' "label") is kept in
DIR/predictions/ as true_<name>.

Metrics (scikit-learn's definitions): accuracy; macro_f1 = f1_score(average="macro", zero_division=0);
log_loss = log_loss(labels=range(C)) (probabilities clipped to [eps, 1-eps], float32 eps); brier =
brier_score_loss(labels=range(C), scale_by_half=False), the mean of sum_c (p_c - onehot_c)^2; ece over 15
equal-width bins of the top-label confidence (Guo et al. 2017); confusion_matrix (rows = true class);
per_class precision, recall, f1, support.

--bootstrap N: a percentile interval for accuracy, macro_f1, log_loss, brier and ece from N Poisson(1)
bootstrap replicates whose weights derive from a hash of (--seed, row id, replicate), in the same pass:
identical across shardings and reruns.

--baseline DIR gates against an earlier eval's DIR/metrics.json.  A metric where higher is better
(accuracy, macro_f1) fails when the upper end of its interval (the value itself without --bootstrap) is
below baseline - --max-drop; one where lower is better (log_loss, brier, ece) fails when the lower end is
above baseline + --max-drop.  The comparison goes into metrics.json under "baseline".

Exit status: 0 done (gate passed); 1 the job failed or is incomplete (rerun to resume), or no row could be
evaluated; 2 bad flags or settings; 3 the baseline gate failed (everything was still written).

Outputs in DIR:
  metrics.json               rows_in, rows_out, rows_failed (prediction), rows_evaluated, rows_failed_eval,
                             accuracy, macro_f1, log_loss, brier, ece, confusion_matrix, per_class,
                             calibration, bootstrap, slices, baseline
  report.html (+ *.png)      confusion matrix, reliability diagram, confidence histogram, per-class bars;
                             self-contained (inline images), readable offline
  failed-eval-*.jsonl        prediction rows that could not be evaluated (label or probabilities unusable)
  predictions/               the prediction run's output (part-*, failed-*, report.json)

Examples:
  bulkinfer eval --model digits --input 'data/digits/test-*.jsonl' --label-field label --output out/eval
  bulkinfer eval --model digits --input 'data/digits/test-*.jsonl' --output out/eval2 --bootstrap 1000 \
      --seed 0 --baseline out/eval --max-drop 0.01
  bulkinfer eval --model minilm --input 'reviews/*.jsonl' --label-field topic --class-names sports,politics \
      --output out/zero-shot
"""

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

EPILOG_SERVE = """\
Routes (Open Inference Protocol / KServe v2 REST, JSON or binary tensors):
  GET  /v2/health/live, /v2/health/ready      (never need the token)
  GET  /v2/models/NAME                        metadata: every input and output with its datatype and shape
                                              (minilm: text BYTES [-1] -> embedding FP32 [-1, 384]; digits:
                                              pixels FP32 [-1, 8, 8] -> label INT32 [-1], probs FP32 [-1, 10]);
                                              an infer request sends every input as [N, ...], JSON or binary,
                                              and gets every output back (or those it names in "outputs")
  GET  /v2/models/NAME/ready, /v2/models/NAME/stats
  POST /v2/models/NAME/infer
NAME is the built-in model name (minilm) or the model directory's name; it may be percent-escaped.
Concurrent requests are merged into one model call (dynamic batching).
Limits: a body over --max-request-bytes gets 413 unread; a body not all received --body-timeout-s after
its headers gets 408; past --max-connections a new connection gets 503 with Retry-After.
SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight and exits 0.

Examples:
  bulkinfer serve --model minilm --port 8000
  BULKINFER_TOKEN=s3cret bulkinfer serve --model minilm --host 0.0.0.0
  curl -s localhost:8000/v2/models/minilm/infer \\
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}'
  bulkinfer serve --model digits --port 8001
  curl -s localhost:8001/v2/models/digits/infer \\
    -d '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8], "data": [0, 0, 5, ...]}]}'
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulkinfer", description="Bulk (offline) ML inference on Apache Beam.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a model over a dataset: files in, predictions out",
        description="Run a model over every row of a dataset and write the predictions.",
        epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(run)
    run.add_argument("--keep-fields", default="", metavar="A,B",
                     help="input fields copied to the output beside the id and the predictions, e.g. labels "
                          "for evaluation or metadata for joins (default: none)")

    ev = sub.add_parser(
        "eval", help="evaluate a classifier (or an embedder, zero-shot) on labelled data",
        description="Evaluate a model on labelled data: metrics.json, report.html and the predictions.",
        epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(ev)
    ev.add_argument("--label-field", default="label", metavar="FIELD",
                    help="row field holding the true class: an integer 0..C-1, or a --class-names name (default: label)")
    ev.add_argument("--slice-field", action="append", default=[], metavar="FIELD",
                    help="also compute every metric per value of this field; repeat for several fields")
    ev.add_argument("--probs-field", default="probs", metavar="FIELD",
                    help="the model's probabilities output, C numbers summing to 1 (default: probs)")
    ev.add_argument("--embedding-field", default="embedding", metavar="FIELD",
                    help="an embedder's output, classified zero-shot by --class-names (default: embedding)")
    ev.add_argument("--class-names", default=None, metavar="A,B,C",
                    help="the classes' names in index order: needed for an embedder (zero-shot); for a classifier "
                         "they label the report and let labels be names")
    ev.add_argument("--bootstrap", type=int, default=0, metavar="N",
                    help="Poisson-bootstrap replicates for the headline metrics' intervals (default: 0, none; "
                         "e.g. 1000)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap weights (default: 0)")
    ev.add_argument("--interval", default="2.5,97.5", metavar="LO,HI",
                    help="the interval's percentiles (default: 2.5,97.5)")
    ev.add_argument("--baseline", default=None, metavar="DIR",
                    help="an earlier eval's output directory to gate against (exit 3 when a metric drops)")
    ev.add_argument("--max-drop", type=float, default=0.0, metavar="X",
                    help="how far a metric may fall behind --baseline beyond its interval, in the metric's own "
                         "units (default: 0)")

    serve = sub.add_parser(
        "serve", help="serve a model over the Open Inference Protocol (KServe v2 REST)",
        description="Serve a model to remote jobs and any v2 client (tritonclient, KServe, curl).",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0 picks a free one)")
    serve.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on every route but health (default: $BULKINFER_TOKEN)")
    serve.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                       help="how long a request may wait for others to share its model call (default: 5)")
    serve.add_argument("--max-batch-rows", type=int, default=1024, help="rows per model call, at most (default: 1024)")
    serve.add_argument("--max-request-bytes", type=int, default=64 << 20,
                       help="larger request bodies get 413, unread (default: 64 MiB)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="connections served at once, idle keep-alive ones included; one more gets 503 "
                            "with Retry-After (default: 512)")
    serve.add_argument("--body-timeout-s", type=float, default=60.0,
                       help="a request body not all received this many seconds after its headers gets 408, "
                            "however slowly it trickles (default: 60)")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    distill = sub.add_parser(
        "distill", help="teacher outputs for distillation: top-k log-probs or embeddings as training shards",
        description="Run a teacher model over a dataset and write its outputs, keyed by id, as shards for a "
                    "training job (Parquet or ArrayRecord) with a manifest.",
        epilog=EPILOG_DISTILL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(distill, formats=("parquet", "array_record"))
    distill.add_argument("--keep-fields", default="", metavar="A,B",
                         help="input fields copied into the shards beside the id (e.g. the student's inputs or "
                              "labels; default: none)")
    distill.add_argument("--top-k", type=int, default=5, metavar="K",
                         help="classifiers: classes kept per row, most probable first (default: 5; at most C)")
    distill.add_argument("--temperature", type=float, default=1.0, metavar="T",
                         help="classifiers: log-probs are log_softmax(log(probs) / T) (default: 1)")
    distill.add_argument("--probs-field", default="probs", metavar="FIELD",
                         help="the teacher's softmax-probability output (default: probs)")
    distill.add_argument("--embedding-field", default="embedding", metavar="FIELD",
                         help="the teacher's embedding output, for embedders (default: embedding)")
    distill.add_argument("--rows-per-shard", type=int, default=100_000, metavar="N",
                         help="rows per shard at most; a unit of work with more gets several (default: 100000)")
    parser.commands = {"run": run, "eval": ev, "serve": serve, "distill": distill}
    parser.commands["stats"] = _stats_parser(sub)
    parser.commands["plan"] = _plan_parser(sub)
    parser.commands["generate"] = _generate_parser(sub)
    return parser


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


EPILOG_GENERATE = """\
Output rows: the id field, completion, tokens_generated, finish_reason ("stop": EOS, a stop token or a
--stop string; "length": --max-new-tokens or the context is full), logprobs with --logprobs, and
--keep-fields.  With --n N > 1 each of these holds N entries, one per sample.

A row's randomness comes from (--seed, its id, the sample index, the token position): its completion
does not depend on the batch, the slot, the order or the other prompts.  A prompt longer than the
context (prompt tokens + 1 > --max-len) is a dead letter that gives its length; prompts are never
truncated.  Units of work, commits, resume, dead letters and exit status are those of `bulkinfer run`
(see its help); a rerun with other sampling settings is refused (use --overwrite or another --output).
Unset sampling flags take the model's generation_config.json, else greedy with 128 new tokens.

Examples:
  bulkinfer generate --model smollm2 --chat --input 'data/prompts/*.jsonl' --output out/gen
  bulkinfer generate --model path/to/qwen2-dir --input 'p/*.parquet' --output out/q --temperature 0.7 \\
    --top-p 0.9 --seed 1 --n 4 --stop '\\n\\n'
"""


def _generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="generate text with a decoder LM: prompts in, completions out",
        description="Generate completions for every prompt of a dataset with a decoder language model.",
        epilog=EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="smollm2 (built in), an HF llama/mistral/qwen2/gpt2 directory or a GGUF file")
    p.add_argument("--input", required=True, metavar="GLOB", help="input files: .jsonl, .parquet or .csv (quote the glob)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--prompt-field", default="prompt", metavar="FIELD", help="row field holding the prompt (default: prompt)")
    p.add_argument("--id-field", default="id", help="row field with the row's id, which also keys its randomness (default: id)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message before each prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="completion tokens at most per sample")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass (1: all)")
    p.add_argument("--min-p", type=float, default=None, metavar="P", help="keep tokens at least P x the top one's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="HF's repetition penalty over prompt and completion tokens (1: off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="root of every row's randomness (default: 0)")
    p.add_argument("--stop", nargs="+", default=None, metavar="STR", help="strings that end a completion (cut before them)")
    p.add_argument("--n", type=int, default=1, metavar="N", help="samples per prompt (default: 1)")
    p.add_argument("--logprobs", action="store_true", help="also write each completion token's log-probability")
    p.add_argument("--slots", type=int, default=32, metavar="S", help="sequences decoded together (default: 32)")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="context per sequence in tokens (default: the model's, at most 1024)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--warmup", action="store_true", help="compile every prefill shape before taking data")
    p.add_argument("--keep-fields", default="", metavar="A,B", help="input fields copied to the output")
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="output format (default: parquet)")
    p.add_argument("--overwrite", action="store_true", help="start from scratch: delete an earlier run's outputs in DIR")
    p.add_argument("--unit-size", type=_size, default=None, metavar="BYTES", help="split input files into units of this size")
    p.add_argument("--wave-units", type=int, default=64, metavar="N", help="units of work per pipeline run (default: 64)")
    p.add_argument("--max-failed-fraction", type=float, default=0.5, metavar="F",
                   help="stop the job when more than this fraction of its rows fail (default: 0.5)")
    p.add_argument("-v", "--verbose", action="store_true", help="log Beam's and bulkinfer's progress")
    return p


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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a built-in model name (minilm: all-MiniLM-L6-v2 text embeddings; digits: an 8x8 "
                        "handwritten-digit classifier) or a sentence-transformers/HF text-encoder directory "
                        "on any Beam filesystem")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the model's max_seq_length)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per device batch, rows x padded length (default: 1024 on the CPU, 2048 on an "
                        "accelerator: Bucketing.for_platform)")
    p.add_argument("--warmup", action="store_true", help="compile every batch shape before taking data")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="persistent XLA compilation cache, shared across runs and processes, so each batch "
                        "shape compiles once per machine; a path every worker can use (local or gs://...) "
                        "(default: each worker's own $JAX_COMPILATION_CACHE_DIR, $XDG_CACHE_HOME/bulkinfer/xla "
                        "or ~/.cache/bulkinfer/xla; 'none' turns it off)")


def _model(args):
    """The model spec for --model and the engine flags; text-only flags on another model are an error."""
    from bulkinfer.models.registry import BUILTIN_FUNCTIONS
    from bulkinfer.models.resolve import model_spec
    from bulkinfer.runtime import Bucketing

    settings = dict(warmup=args.warmup, compilation_cache_dir=_compilation_cache(args.compilation_cache))
    text_only = {"--dtype": ("dtype", args.dtype if args.dtype != "float32" else None),
                 "--max-length": ("max_length", args.max_length),
                 "--token-budget": ("bucketing", args.token_budget and Bucketing(token_budget=args.token_budget))}
    given = {flag: kv for flag, kv in text_only.items() if kv[1] is not None}
    if args.model in BUILTIN_FUNCTIONS and given:
        raise ValueError(f"{', '.join(given)} apply to text models only, not to {args.model!r}")
    settings.update(dict(given.values()))
    return model_spec(args.model, **settings)


def _compilation_cache(value: str | None) -> str | None:
    """The spec's compilation_cache_dir: a named path, None for 'none', else each worker's own default
    (resolved on the worker, never the launcher's home: see bulkinfer.runtime.process)."""
    from bulkinfer.runtime.process import WORKER_LOCAL

    if value is not None:
        return None if value.lower() == "none" else value
    return WORKER_LOCAL


def main(argv: list[str] | None = None) -> int:
    args, beam_args = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Beam warns on import about optional Google Cloud clients that local jobs never use.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
    jobs = {"run": _run, "eval": _eval, "stats": _stats, "distill": _distill, "generate": _generate}
    if args.command in jobs:  # the flags these do not take are Beam pipeline options
        if _beam_flags_error(args.command, beam_args):
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


def _beam_flags_error(command: str, beam_args: list[str]) -> bool:
    """Prints one error line and returns True when `beam_args` (the flags a job's parser did not take)
    hold flags that are not Beam pipeline options, with a hint for our own flags misspelt with '_' and
    for an unquoted --input glob that the shell expanded."""
    unknown = _unknown_beam_flags(beam_args)
    if not unknown:
        return False
    ours = {o for a in _parser().commands[command]._actions for o in a.option_strings}
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


def _check_served(model) -> None:
    """Raises ValueError when the server answers that it does not serve the model or refuses the token;
    a server that cannot be reached now is left to the job's retry budget."""
    from bulkinfer.serve.client import RemoteError, V2Client

    try:
        V2Client(model.url, token=model.token, timeout_s=30).model_metadata(model.name)
    except RemoteError as e:
        if e.status in (401, 403, 404):
            raise ValueError(f"{model.url} refuses model {model.name!r} ({e}); check --model and --server-token "
                             "against what `bulkinfer serve` was started with") from None
    except OSError:
        pass


def _serve(args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.serve import ServeConfig, serve

    try:
        config = ServeConfig(host=args.host, port=args.port, token=args.token or os.environ.get("BULKINFER_TOKEN"),
                             max_queue_delay_ms=args.max_queue_delay_ms, max_batch_rows=args.max_batch_rows,
                             max_request_bytes=args.max_request_bytes, max_connections=args.max_connections,
                             body_timeout_s=args.body_timeout_s)
        return serve(_served(args), config)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"bulkinfer serve: error: {e}", file=sys.stderr)
        return 2


def _job_model(args):
    """The model a job's flags name: a RemoteModel with --server (checked to be served), else the local spec."""
    if args.server:
        local_only = [f for f, v in (("--max-length", args.max_length), ("--token-budget", args.token_budget),
                                     ("--warmup", args.warmup), ("--compilation-cache", args.compilation_cache),
                                     ("--dtype", args.dtype != "float32"),
                                     ("--processes-per-accelerator", args.processes_per_accelerator)) if v]
        if local_only:
            raise ValueError(f"{', '.join(local_only)} configure the local engine and do not apply with --server; "
                             "pass them to `bulkinfer serve` instead")
        from bulkinfer.serve.client import RemoteModel, RetryPolicy

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
def _generate(args, beam_args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import generate
    from bulkinfer.tasks import run as job

    try:
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, stop=tuple(args.stop or ()), n=args.n, logprobs=args.logprobs)
        gen = generate.generator(args.model, sampling=sampling, chat=args.chat, system=args.system,
                                 prompt_field=args.prompt_field, id_field=args.id_field, slots=args.slots,
                                 max_len=args.max_len, dtype=args.dtype, warmup=args.warmup)
        keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
        spec = job.JobSpec(input=args.input, output=args.output, format=args.format, id_field=args.id_field,
                           keep_fields=keep, overwrite=args.overwrite, wave_units=args.wave_units,
                           max_failed_fraction=args.max_failed_fraction,
                           **({} if args.unit_size is None else {"unit_size": args.unit_size}))
        report = generate.run(gen, spec, beam_args)
    except job.JobFailed as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer generate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_per_s", "tokens",
                                             "tokens_per_s", "elapsed_s")}))
    return _exit_status(report, args.output)


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


def _run(args, beam_args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import run as job

    try:
        model = _job_model(args)
        keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
        spec = _job_spec(args, keep_fields=keep)
        report = job.run(model, spec, beam_args)
    except job.JobFailed as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_per_s", "elapsed_s")}))
    return _exit_status(report, args.output)


def _distill(args, beam_args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import distill as job
    from bulkinfer.tasks.run import JobFailed

    try:
        spec = job.DistillSpec(top_k=args.top_k, temperature=args.temperature, format=args.format,
                               probs_field=args.probs_field, embedding_field=args.embedding_field,
                               rows_per_shard=args.rows_per_shard)
        keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
        teacher = _job_spec(argparse.Namespace(**{**vars(args), "format": "parquet"}), keep_fields=keep)
        manifest = job.distill(_job_model(args), teacher, spec, beam_args)
    except JobFailed as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer: error: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("rows_in", "rows_out", "rows_failed", "kind", "top_k", "temperature",
                                        "format")}
    summary["shards"] = len(manifest["shards"])
    if manifest.get("already_completed"):
        summary["already_completed"] = True
    print(json.dumps(summary))
    return 0


def _eval(args, beam_args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import evaluate as ev
    from bulkinfer.tasks import run as job

    try:
        try:
            lo, hi = (float(x) for x in args.interval.split(","))
        except ValueError:
            raise ValueError(f"--interval {args.interval!r}: write two percentiles, e.g. 2.5,97.5") from None
        names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else None
        spec = ev.EvalSpec(label_field=args.label_field, slice_fields=tuple(args.slice_field),
                           probs_field=args.probs_field, embedding_field=args.embedding_field, class_names=names,
                           bootstrap=args.bootstrap, seed=args.seed, percentiles=(lo, hi), baseline=args.baseline,
                           max_drop=args.max_drop)
        metrics = ev.evaluate(_job_model(args), _job_spec(args), spec, beam_args)
    except ev.GateFailed as e:
        print(ev.summary(e.metrics))
        print(f"bulkinfer eval: {e}", file=sys.stderr)
        return ev.GATE_FAILED_EXIT
    except (job.JobFailed, ev.NothingEvaluated) as e:
        print(f"bulkinfer eval: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer eval: error: {e}", file=sys.stderr)
        return 2
    print(ev.summary(metrics))
    return 0


# --- bulkinfer stats ------------------------------------------------------------------------------------

EPILOG_STATS = """\
Runs the model over the input like `bulkinfer run` (into DIR/predictions, resumable, with dead letters),
then aggregates the predictions in one more Beam pipeline with mergeable sketches: no rows are collected
on one worker.  Any flag not listed above is a Beam pipeline option for both pipelines.

DIR/stats.json, overall and per --slice-field value:
  classifier (an output 'probs' [C]): predicted-class counts; confidence (top probability), margin
    (top1 - top2) and entropy (bits): mean, std, KLL quantiles 0.01 ... 0.99, 20-bin histogram
  embedder (an output 'embedding' [D]): L2 norm (mean, std, quantiles, histogram); per-dimension mean and
    variance; mean pairwise cosine on a sample of --sample-size rows chosen by a hash of their id
  drift (with --baseline): Jensen-Shannon distance (base 2, 0..1) per distribution against the baseline
  sketch: the KLL sketch's k and normalized rank error.  Counts, histograms, means and variances are
    exact and identical for any sharding; quantiles are within the stated rank error.
DIR/report.html (+ PNGs): class distribution, confidence histogram, norm histogram, drift.

Exit status: 0 done; 1 a pipeline failed, the predictions are incomplete (rerun to resume) or no row was
predicted; 2 bad flags or settings.

Examples:
  bulkinfer stats --model digits --input 'data/digits/test-*.jsonl' --output out/digits-stats
  bulkinfer stats --model minilm --input 'texts/*.jsonl' --output out/minilm-stats --slice-field lang
  bulkinfer stats --model digits --input 'new/*.jsonl' --output out/new --baseline out/digits-stats
"""


def _stats_parser(sub) -> argparse.ArgumentParser:
    stats = sub.add_parser(
        "stats", help="statistics of a model's predictions over a dataset, and drift against a baseline",
        description="Run a model over a dataset and summarize its predictions with mergeable sketches.",
        epilog=EPILOG_STATS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _job_args(stats)
    stats.add_argument("--slice-field", action="append", default=[], metavar="FIELD",
                       help="also compute the statistics per value of this input field (repeat for more fields)")
    stats.add_argument("--baseline", metavar="DIR", default=None,
                       help="an earlier stats run's output directory: adds the drift against it to stats.json")
    stats.add_argument("--probs-field", default=None, metavar="NAME",
                       help="the model's softmax-probabilities output (default: probs, if the model has it)")
    stats.add_argument("--embedding-field", default=None, metavar="NAME",
                       help="the model's embedding output (default: embedding, if the model has it)")
    stats.add_argument("--sample-size", type=int, default=1000, metavar="N",
                       help="rows sampled (by id hash) for the mean pairwise cosine of embeddings (default: 1000)")
    stats.add_argument("--sketch-k", type=int, default=200, metavar="K",
                       help="the KLL quantile sketch's k: 200 gives ~1.3%% rank error (default: 200)")
    return stats


def _stats(args, beam_args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import stats as job
    from bulkinfer.tasks.run import JobFailed

    try:
        spec = job.StatsSpec(slice_fields=tuple(args.slice_field), baseline=args.baseline,
                             probs_field=args.probs_field, embedding_field=args.embedding_field,
                             sample_size=args.sample_size, sketch_k=args.sketch_k)
        result = job.stats(_job_model(args), _job_spec(args), spec, beam_args)
    except JobFailed as e:
        print(f"bulkinfer stats: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer stats: error: {e}", file=sys.stderr)
        return 2
    for line in job.summary(result):
        print(line)
    out = args.output.rstrip("/")
    print(f"wrote {out}/{job.STATS_FILE} and {out}/report.html")
    if result["rows_out"] == 0:
        print(f"bulkinfer stats: error: no prediction rows to summarize: all {result['rows_in']} input rows failed "
              f"(see {out}/predictions/failed-*.jsonl)", file=sys.stderr)
        return 1
    return 0


def _plan(args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.tasks import plan
    from bulkinfer.tasks import run as job

    try:
        keep = tuple(f.strip() for f in args.keep_fields.split(",") if f.strip())
        spec = job.JobSpec(input=args.input, output="", format=args.format, id_field=args.id_field,
                           input_field=args.input_field, keep_fields=keep, wave_units=args.wave_units,
                           **({} if args.unit_size is None else {"unit_size": args.unit_size}))
        settings = plan.PlanSpec(sample=args.sample, deadline_s=args.deadline, price_per_hour=args.price_per_hour,
                                 accelerator=args.accelerator, rows_per_s=args.rows_per_s)
        report = plan.plan(_prediction_model(args), spec, settings)
    except job.JobFailed as e:
        print(f"bulkinfer plan: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, PermissionError, ValueError, TypeError) as e:
        print(f"bulkinfer plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else plan.summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
