"""`bulkinfer generate`: completions for every prompt of a dataset with a decoder language model."""

from __future__ import annotations

import argparse
import json

from bulkinfer.cli.args import _size
from bulkinfer.cli.jobs import _exit_status, _job_errors, _keep_fields

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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the model's weights and activations (default: float32)")
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


def _generate(args, beam_args) -> int:
    from bulkinfer.tasks import generate
    from bulkinfer.tasks import run as job

    with _job_errors(settings_prefix="bulkinfer generate"):
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, stop=tuple(args.stop or ()), n=args.n, logprobs=args.logprobs)
        gen = generate.generator(args.model, sampling=sampling, chat=args.chat, system=args.system,
                                 prompt_field=args.prompt_field, id_field=args.id_field, slots=args.slots,
                                 max_len=args.max_len, dtype=args.dtype, warmup=args.warmup)
        spec = job.JobSpec(input=args.input, output=args.output, format=args.format, id_field=args.id_field,
                           keep_fields=_keep_fields(args), overwrite=args.overwrite, wave_units=args.wave_units,
                           max_failed_fraction=args.max_failed_fraction,
                           **({} if args.unit_size is None else {"unit_size": args.unit_size}))
        report = generate.run(gen, spec, beam_args)
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_out", "rows_failed", "rows_per_s", "tokens",
                                             "tokens_per_s", "elapsed_s")}))
    return _exit_status(report, args.output)
