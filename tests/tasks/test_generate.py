"""The generation job end to end on a tiny random Llama directory: `bulkinfer generate` with dead letters
and resume, the same completions as the generator alone (batch invariance through Beam),
`BulkInference` in a pipeline, and `bulkinfer serve` with sampling settings as request parameters."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from bulkinfer import cli
from bulkinfer.beam.transform import BulkInference
from bulkinfer.models.generator import Generator
from bulkinfer.runtime.generate import PromptError
from bulkinfer.runtime.sampling import SamplingParams
from bulkinfer.tasks import generate

LLAMA = str(Path(__file__).resolve().parents[1] / "fixtures" / "decoders" / "llama")
QWEN2 = str(Path(__file__).resolve().parents[1] / "fixtures" / "decoders" / "qwen2")
MAX_LEN = 40
FLAGS = ["--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "0.95", "--seed", "3", "--max-len", str(MAX_LEN),
         "--slots", "3", "--format", "jsonl"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    rows = [{"id": i, "prompt": p, "topic": f"t{i}"} for i, p in enumerate(
        ["The", "Hello, world!", "A language model predicts", "Prompts of different lengths", "one", "two words"])]
    rows.append({"id": "long", "prompt": "token " * 60, "topic": "x"})  # > MAX_LEN tokens
    rows.append({"id": "none", "topic": "y"})  # no prompt
    rows.append({"id": "num", "prompt": 5, "topic": "z"})  # not text
    path = root / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="module")
def generated(prompts_file, tmp_path_factory):
    path, _ = prompts_file
    out = tmp_path_factory.mktemp("gen") / "out"
    code = cli.main(["generate", "--model", LLAMA, "--input", str(path), "--output", str(out), "--keep-fields",
                     "topic", *FLAGS])
    return code, out


def read_rows(out: Path, pattern: str) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob(pattern)) for line in f.read_text().splitlines()]


@pytest.mark.slow
def test_cli_generates_with_dead_letters_and_tokens_in_the_report(generated, prompts_file):
    code, out = generated
    assert code == 0
    rows = {r["id"]: r for r in read_rows(out, "part-*.jsonl")}
    assert sorted(map(str, rows)) == ["0", "1", "2", "3", "4", "5"]
    assert all(set(r) == {"id", "topic", "completion", "tokens_generated", "finish_reason"} for r in rows.values())
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["tokens_generated"] <= 6 for r in rows.values())
    assert rows[2]["topic"] == "t2"
    letters = {d["id"]: d["error"] for d in read_rows(out, "failed-*.jsonl")}
    assert set(letters) == {"long", "none", "num"}
    assert re.search(r"model failed: PromptError: the prompt has 6\d tokens; .* exceeds the context of 40 tokens",
                     letters["long"])
    assert "field 'prompt' is missing" in letters["none"]
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (9, 6, 3)
    assert report["tokens"] == sum(r["tokens_generated"] for r in rows.values())


@pytest.mark.slow
def test_job_completions_equal_the_generator_alone_and_resume_skips(generated, prompts_file, tmp_path):
    _, out = generated
    _, rows = prompts_file
    written = {r["id"]: r["completion"] for r in read_rows(out, "part-*.jsonl")}
    gen = generate.generator(LLAMA, sampling=dict(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=3),
                             slots=1, max_len=MAX_LEN)
    loaded = gen.load()
    for r in rows[:6]:
        alone = loaded.predict({"prompt": [r["prompt"]], "id": [str(r["id"])]})["completion"][0]
        assert alone == written[r["id"]]
    path, _ = prompts_file
    again = cli.main(["generate", "--model", LLAMA, "--input", str(path), "--output", str(out), "--keep-fields",
                      "topic", *FLAGS])
    assert again == 0 and json.loads((out / "report.json").read_text())["units_skipped"] == 1
    other = [f if f != "0.9" else "0.5" for f in FLAGS]
    assert cli.main(["generate", "--model", LLAMA, "--input", str(path), "--output", str(out), "--keep-fields",
                     "topic", *other]) == 2  # other sampling settings: refused, not mixed in


@pytest.mark.slow
def test_bulk_inference_in_a_pipeline_with_chat_and_n_samples():
    gen = Generator(model=generate.language_model(QWEN2), chat=True, system="Be brief.", max_len=96, slots=2,
                    sampling=SamplingParams(temperature=1.0, max_new_tokens=4, n=2, logprobs=True, seed=1))
    rows = [{"id": i, "prompt": p} for i, p in enumerate(["Hi", "Name a colour", "x " * 100])]

    def check(outputs):
        assert sorted(r["id"] for r in outputs) == [0, 1]
        for r in outputs:
            assert len(r["completion"]) == len(r["finish_reason"]) == len(r["tokens_generated"]) == 2
            assert all(len(lp) == t and all(v <= 0 for v in lp) for lp, t in zip(r["logprobs"], r["tokens_generated"]))

    def check_letters(letters):
        assert [d["id"] for d in letters] == [2] and "context of 96 tokens" in letters[0]["error"], letters

    with TestPipeline() as p:
        good, bad = p | beam.Create(rows) | BulkInference(gen).with_exception_handling()
        assert_that(good, check, label="good")
        assert_that(bad, check_letters, label="bad")


def test_generator_prompt_errors_name_the_length():
    gen = Generator(model=generate.language_model(LLAMA), max_len=16, sampling=SamplingParams(max_new_tokens=2))
    loaded = gen.load()
    n = len(loaded.lm.encode("word " * 30))
    with pytest.raises(PromptError, match=f"^the prompt has {n} tokens; .* context of 16 tokens"):
        loaded.predict({"prompt": ["word " * 30], "id": ["a"]})
    with pytest.raises(ValueError, match="a system message needs chat=True"):
        Generator(model=gen.model, system="x")


def test_serve_takes_sampling_settings_as_request_parameters():
    from bulkinfer.serve import ServeConfig, start

    gen = generate.generator(LLAMA, id_field=None, max_len=MAX_LEN, slots=2)
    srv = start(gen.load(), ServeConfig(port=0))
    try:
        def infer(prompts, **parameters):
            body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}],
                    "parameters": parameters}
            request = urllib.request.Request(f"{srv.url}/v2/models/{gen.name}/infer", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, reply = infer(["The", "Hello"], max_new_tokens=3, temperature=0)
        assert status == 200
        out = {o["name"]: o for o in reply["outputs"]}
        assert out["completion"]["datatype"] == "BYTES" and len(out["completion"]["data"]) == 2
        assert np.all(np.asarray(out["tokens_generated"]["data"]) <= 3)
        longer = {o["name"]: o for o in infer(["The", "Hello"], max_new_tokens=5, temperature=0)[1]["outputs"]}
        assert [a.startswith(b) for a, b in zip(longer["completion"]["data"], out["completion"]["data"])] == [True] * 2
        status, reply = infer(["The"], top_p=0)
        assert status == 400 and "top_p=0 is out of range" in reply["error"]
    finally:
        srv.stop()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_greedy_equals_transformers_generate(family):
    """The generation engine (2 slots for 4 prompts: slots are refilled) against transformers'
    generate(do_sample=False) on the same checkpoint (tests/fixtures/decoders, scripts/make_decoder_fixtures.py)."""
    root = Path(LLAMA).parent
    gen = Generator(model=generate.language_model(str(root / family)), slots=2, max_len=64, prefill_lengths=(16, 32),
                    sampling=SamplingParams(temperature=0, max_new_tokens=16))
    loaded = gen.load()
    with np.load(root / family / "reference.npz") as ref:
        prompts = [ref[f"ids_{i}"].tolist() for i in range(4)]
        expected = [ref[f"greedy_{i}"].tolist() for i in range(4)]
    out = loaded.engine.generate(prompts, row_ids=list(range(4)), params=gen.sampling)
    for want, [c] in zip(expected, out):
        if len(want) < 16:  # transformers stopped on an EOS, which ends ours too and is not part of it
            assert want[-1] in loaded.lm.eos_token_ids and (c.tokens, c.finish_reason) == (want[:-1], "stop")
        else:
            assert (c.tokens, c.finish_reason) == (want, "length")


def test_a_decoder_lm_is_refused_by_the_prediction_jobs_and_generates_in_bulk_inference(tmp_path, capsys):
    # `bulkinfer run|eval|stats|distill|plan` take embedders and classifiers: a decoder LM is a bad flag
    # (exit 2, naming `bulkinfer generate`), never a worker crash counted as an outage.
    for command in (["run", "--output", str(tmp_path / "o")], ["plan"]):
        assert cli.main([*command, "--model", LLAMA, "--input", str(tmp_path / "*.jsonl")]) == 2
        assert "bulkinfer generate" in capsys.readouterr().err
    # In a pipeline, the same path generates (greedy, Generator's defaults).
    transform = BulkInference(LLAMA)
    assert isinstance(transform._model, Generator) and transform._model.sampling == SamplingParams()


def test_gpt2_context_past_its_learned_positions_is_refused():
    from bulkinfer.models.lm import LanguageModel

    gpt2 = LanguageModel.from_name(str(Path(LLAMA).parent / "gpt2"))
    with pytest.raises(ValueError, match="learned positions"):
        Generator(model=gpt2, max_len=gpt2.load().config.max_position_embeddings + 1).load()
