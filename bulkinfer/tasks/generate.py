"""The generation job: prompts in, completions out, through the run job's machinery (units of work,
commits, resume, dead letters, report.json).

    DIR/part-*.parquet   id, completion, tokens_generated, finish_reason (+ logprobs, + kept fields)
    DIR/failed-*.jsonl   dead letters: a prompt too long for the context (with its length), a missing or
                         non-text prompt, a missing id
    DIR/report.json      rows_in = rows_out + rows_failed, rows/s, tokens (generated) and tokens/s

    >>> gen = generator("smollm2", sampling=SamplingParams(temperature=0.7, seed=1), chat=True)
    >>> run(gen, run.JobSpec(input="data/prompts/*.jsonl", output="out/gen"))

A rerun resumes (committed units are skipped); a rerun with other sampling settings is refused, since
they are part of the generator's digest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bulkinfer.models.generator import Generator
from bulkinfer.runtime.sampling import SamplingParams
from bulkinfer.tasks import run as job

# generation_config.json keys -> SamplingParams fields (transformers' names are the same).
_FROM_GENERATION_CONFIG = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def language_model(model, **settings):
    """A language-model spec: for a string, `LanguageModel.from_name` (the built-in smollm2, an HF
    llama/mistral/qwen2/gpt2 directory or a GGUF file, local or a URL); a spec is returned as it is (a
    Generator's own model).  Raises CheckpointError (a ValueError) naming the value when it is not a
    decoder LM, and TypeError for an object that is not a spec."""
    if isinstance(model, Generator):
        return model.model
    if hasattr(model, "load"):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model {model!r} is neither a name, a path nor a language-model spec")
    from bulkinfer.models.lm import LanguageModel

    return LanguageModel.from_name(model, **settings)


def sampling_defaults(model) -> dict:
    """The model's own sampling defaults (its generation_config.json next to the weights), as SamplingParams
    fields; do_sample false (or absent) means greedy, as in transformers' generate."""
    path = Path(getattr(model, "path", "") or "")
    config_file = (path if path.is_dir() else path.parent) / "generation_config.json"
    if not str(path) or not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    out = {k: config[k] for k in _FROM_GENERATION_CONFIG if isinstance(config.get(k), int | float)}
    if not config.get("do_sample", False):
        out["temperature"] = 0.0
    if out.get("top_k") is not None:
        out["top_k"] = int(out["top_k"])
    if "max_new_tokens" in out:
        out["max_new_tokens"] = int(out["max_new_tokens"])
    return out


def generator(model, *, sampling: dict | SamplingParams | None = None, **settings) -> Generator:
    """A Generator for `model` (see `language_model`).  sampling: SamplingParams, or the settings given
    (None values are left to the model's generation_config.json, then SamplingParams' defaults: greedy
    when the model's config says do_sample false).  settings: Generator's (chat, system, slots, ...)."""
    lm = language_model(model)
    if not isinstance(sampling, SamplingParams):
        given = {k: v for k, v in (sampling or {}).items() if v is not None}
        sampling = SamplingParams(**{**sampling_defaults(lm), **given})
    return Generator(model=lm, sampling=sampling, **settings)


def run(gen: Generator, spec: job.JobSpec, pipeline_args: list[str] | None = None) -> dict:
    """Runs the generation job (resuming an interrupted one) and returns its report (also written to
    DIR/report.json) with `tokens` (generated) and `tokens_per_s` besides the run job's counts.

    Raises ValueError when the job's id field is not the generator's, and what `run.run` raises."""
    if gen.id_field is not None and spec.id_field != gen.id_field:
        raise ValueError(f"the job's id field {spec.id_field!r} differs from the generator's {gen.id_field!r}; "
                         "set both from --id-field")
    spec = dataclasses.replace(spec, input_field=None)  # the generator's inputs are named after their fields
    return job.run(gen, spec, pipeline_args)
