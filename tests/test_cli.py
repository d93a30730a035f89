"""End-to-end: the real `bulkinfer` command in a subprocess, on real files (`in_process` where the subject is
not the process: reruns and row handling, each command also run for real here)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkinfer.testing import cosine, kill_after_first_commit

ROOT = Path(__file__).resolve().parents[1]


def bulkinfer(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "bulkinfer.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def in_process(*args):
    """`bulkinfer ARGS` run by `main` in this process (the model loaded once for the session, no interpreter
    start): (returncode, stdout, stderr) like `bulkinfer`'s.  For tests whose subject is not the process."""
    from bulkinfer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["bulkinfer", *map(str, args)], code, out.getvalue(), err.getvalue())


def test_run_embeds_jsonl_rows_like_sentence_transformers(tmp_path, reference):
    texts, expected = reference
    n = len(texts)
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as a, open(tmp_path / "b.jsonl", "w", encoding="utf-8") as b:
        for i in range(2 * n):  # every reference text twice, once in each file
            (a if i % 2 else b).write(json.dumps({"id": f"r{i}", "text": texts[i % n]}) + "\n")
        b.write('{"id": "bad-1", "text": 7}\n{"id": "bad-2"}\nnot json\n')
    out = tmp_path / "out"
    proc = bulkinfer("run", "--model", "minilm", "--input", tmp_path / "*.jsonl", "--output", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (2 * n + 3, 2 * n, 3)
    assert report["model"] == "minilm" and report["runner"] == "FnApiRunner" and report["rows_per_s"] > 0
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read()
    assert table.column_names == ["id", "embedding"]
    rows = table.to_pydict()
    got = np.array(rows["embedding"], np.float32)
    assert got.shape == (2 * n, 384)
    order = np.array([int(i[1:]) % n for i in rows["id"]])
    assert sorted(int(i[1:]) for i in rows["id"]) == list(range(2 * n))
    assert cosine(got, expected[order]).min() >= 0.9999
    np.testing.assert_allclose(got, expected[order], atol=1e-5)
    failed = [json.loads(line) for f in out.glob("failed-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted((str(d["id"]), d["stage"]) for d in failed) == [
        ("None", "read"), ("bad-1", "inference"), ("bad-2", "inference")]
    assert all(d["error"] and d["source"].endswith("b.jsonl") for d in failed)


def test_jsonl_output_rerun_resumes_and_other_settings_need_overwrite(tmp_path):
    """In process (`main`): the subprocess runs above and below show the real command's exit and output."""
    (tmp_path / "in.csv").write_text("key,body\nk1,hello world\nk2,second row\n")
    out = tmp_path / "out"
    args = ["run", "--model", "minilm", "--input", tmp_path / "in.csv", "--output", out, "--format", "jsonl",
            "--id-field", "key", "--text-field", "body"]
    assert in_process(*args).returncode == 0
    files = sorted(out.glob("part-*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["k1", "k2"] and all(len(r["embedding"]) == 384 for r in rows)
    again = in_process(*args)  # everything is committed: nothing to redo
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["units_skipped"] == 1 and report["rows_out"] == 2
    assert sorted(out.glob("part-*.jsonl")) == files
    other = in_process(*args[:-6], "--id-field", "key", "--text-field", "body")  # parquet now
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert in_process(*args[:-6], "--id-field", "key", "--text-field", "body", "--overwrite").returncode == 0
    assert not list(out.glob("part-*.jsonl")) and len(list(out.glob("part-*.parquet"))) == 1


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_lone_surrogate_row_is_one_dead_letter_and_the_job_succeeds(tmp_path, fmt):
    # Valid JSON whose strings decode to lone surrogates, which UTF-8, Arrow and the tokenizer refuse.
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "hello world"}\n{"id": "s1", "text": "ok\\ud800bad"}\n'
                                       '{"id": "x\\udc00", "text": "second row"}\n', encoding="utf-8")
    out = tmp_path / "out"
    args = ["run", "--model", "minilm", "--input", tmp_path / "in.jsonl", "--output", out, "--format", fmt]
    proc = in_process(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"], report["reconciled"]) == (3, 2, 1, True)
    [letter] = [json.loads(line) for f in out.glob("failed-*.jsonl") for line in f.read_text("utf-8").splitlines()]
    assert letter["id"] == "s1" and letter["record"] == {"id": "s1", "text": "ok\\ud800bad"}
    assert "line 2 (id 's1'): field 'text' holds a lone surrogate U+D800 at character 2" in letter["error"]
    if fmt == "parquet":
        ids = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().column("id").to_pylist()
        assert sorted(ids) == ["a", "x\\udc00"]  # Parquet holds the escape's text
    else:
        ids = [json.loads(line)["id"] for f in out.glob("part-*.jsonl") for line in f.read_text("utf-8").splitlines()]
        assert sorted(ids) == ["a", "x\udc00"]  # a JSON escape: the very same string
    assert in_process(*args).returncode == 0  # a rerun finds it committed


def test_a_small_job_whose_every_row_fails_exits_1_naming_the_dead_letters(tmp_path, capsys):
    # Under the failure limit's minimum (100 rows) the job runs to the end; it still did nothing.
    from bulkinfer.cli import main

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "image": [0] * 64}) + "\n" for i in range(3)))
    assert main(["run", "--model", "digits", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")]) == 1
    assert "every one of the 3 rows failed" in capsys.readouterr().err
    assert len((tmp_path / "o" / "report.json").read_text()) and list((tmp_path / "o").glob("failed-*.jsonl"))


def test_digits_labels_held_out_images_with_their_targets_kept(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # the split documented in bulkinfer/models/digits.py: [N, 8, 8] 0..16, [N]
    _, images, _, targets = train_test_split(digits.images, digits.target, test_size=0.25, random_state=0,
                                             stratify=digits.target)
    with open(tmp_path / "digits.jsonl", "w") as f:
        for i, (image, target) in enumerate(zip(images, targets)):
            pixels = image.reshape(-1).tolist() if i % 2 else image.tolist()  # 64 numbers, or 8 x 8
            f.write(json.dumps({"id": i, "pixels": pixels, "target": int(target)}) + "\n")
        f.write(json.dumps({"id": "short", "pixels": [1, 2, 3], "target": 0}) + "\n")
    out = tmp_path / "out"
    proc = bulkinfer("run", "--model", "digits", "--input", tmp_path / "digits.jsonl", "--output", out,
                     "--keep-fields", "target")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (len(targets) + 1, len(targets), 1)
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read()
    assert table.column_names == ["id", "target", "label", "probs"]
    assert str(table.schema.field("label").type) == "int32"
    assert str(table.schema.field("probs").type) == "fixed_size_list<element: float>[10]"
    accuracy = float(np.mean(np.array(table["label"]) == np.array(table["target"])))
    assert accuracy >= 0.95, accuracy
    letter = json.loads(next(out.glob("failed-*.jsonl")).read_text().splitlines()[0])
    assert "field 'pixels' has shape [3], expected [8, 8] (or 64 numbers, row-major)" in letter["error"]


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "neither a built-in name (digits, minilm) nor a directory"),
    (["--model", "minilm", "--input", "/nonexistent/*.jsonl"], "no input file matches"),
    (["--model", "digits", "--packing", "on"], "--packing applies to text models only, not to 'digits'"),
    (["--server", "http://127.0.0.1:1", "--packing", "off"], "--packing configures the local engine and does not apply"),
    (["--server", "http://127.0.0.1:1", "--max-in-flight", "0"],
     "--max-in-flight configures the local engine and does not apply"),
])
def test_bad_configuration_is_one_clear_line(tmp_path, args, message):
    base = {"--model": "minilm", "--input": str(ROOT / "data/sample/part-0.jsonl"), "--output": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = bulkinfer("run", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _model_copy(tmp_path, minilm_spec):
    """A copy of the MiniLM directory whose files can be broken one at a time (weights linked, not copied)."""
    src, dst = Path(minilm_spec.path), tmp_path / "model"
    dst.mkdir()
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    return dst


def _truncate_weights(d):
    data = (d / "model.safetensors").read_bytes()[:5_000_000]
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(data)


def _shrink_ffn_in_config(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 1024}))


def _drop_tokenizer(d):
    (d / "tokenizer.json").unlink()


@pytest.mark.parametrize("breakage, message", [
    (_truncate_weights, "model.safetensors: cannot read weights"),
    (_shrink_ffn_in_config, "do not match config.json, e.g. encoder.layer.0.intermediate.dense.weight: "
                            "shape (1536, 384), config implies (1024, 384)"),
    (_drop_tokenizer, "tokenizer.json: file is missing"),
])
def test_broken_checkpoint_is_one_clear_line(tmp_path, minilm_spec, breakage, message):
    model = _model_copy(tmp_path, minilm_spec)
    breakage(model)
    proc = bulkinfer("run", "--model", model, "--input", ROOT / "data/sample/part-0.jsonl", "--output", tmp_path / "o")
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_unwritable_output_directory_is_one_clear_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    proc = bulkinfer("run", "--model", "minilm", "--input", ROOT / "data/sample/part-0.jsonl",
                     "--output", tmp_path / "a-file" / "out")
    assert proc.returncode == 2 and "is not writable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_mistyped_flag_is_an_error_not_silently_ignored(tmp_path):
    proc = bulkinfer("run", "--model", "minilm", "--input", ROOT / "data/sample/part-0.jsonl",
                     "--output", tmp_path / "o", "--text_field", "body", "--direct_num_workers=1")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    assert "unrecognized arguments: --text_field (did you mean --text-field?)" in proc.stderr
    assert "--direct_num_workers" not in proc.stderr  # a real Beam option passes


def test_an_unquoted_glob_expanded_by_the_shell_is_an_error_not_one_file(tmp_path):
    files = sorted(str(p) for p in (ROOT / "data/sample").glob("*.jsonl"))  # what the shell makes of data/*.jsonl
    proc = bulkinfer("run", "--model", "minilm", "--input", *files, "--output", tmp_path / "o", "--runner",
                     "FnApiRunner")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    assert f"unrecognized arguments: {', '.join(files[1:])}" in proc.stderr
    assert "quote the --input glob" in proc.stderr and "FnApiRunner" not in proc.stderr.split(";")[0]


def test_help_teaches_the_flags_and_beam_pass_through():
    proc = bulkinfer("run", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--input", "--output", "--id-field", "--text-field", "--format", "--runner",
                 "failed-*.jsonl", "report.json", "--accelerator", "--min-ram", "--unit-size", "--wave-units",
                 "--max-failed-fraction", "--allow-missing-ids", "--server-retry-budget-s", "units_resumed"):
        assert flag in proc.stdout


def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "BULKINFER_EXAMPLE_OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    files = list(tmp_path.glob("part-*.parquet"))
    assert files and sum(pq.read_metadata(f).num_rows for f in files) == 3000


def test_compilation_cache_defaults_to_each_workers_own_cache_dir(monkeypatch, tmp_path):
    from bulkinfer.cli.args import _compilation_cache
    from bulkinfer.runtime.process import WORKER_LOCAL, compilation_cache_dir

    # The launcher's home never travels to workers: the spec says "worker-local", resolved on the worker.
    assert _compilation_cache(None) == WORKER_LOCAL
    assert _compilation_cache("none") is None and _compilation_cache("/x") == "/x"
    monkeypatch.chdir(tmp_path)  # a relative path is the launcher's, made absolute as --input and --output are
    assert _compilation_cache("rel") == str(tmp_path / "rel") and _compilation_cache("gs://b/x") == "gs://b/x"
    worker = {"XDG_CACHE_HOME": str(tmp_path)}
    assert compilation_cache_dir(_compilation_cache(None), worker) == str(tmp_path / "bulkinfer" / "xla")
    assert compilation_cache_dir(WORKER_LOCAL, {**worker, "JAX_COMPILATION_CACHE_DIR": "/elsewhere"}) is None


@pytest.mark.slow
def test_bom_files_two_processes_with_a_hint_an_edited_input_and_changed_fields(tmp_path, minilm):
    """BOM files give every row with its id; 2 processes with --accelerator commit every unit reconciled;
    an edited input is redone; another --text-field on the same output directory is refused."""
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps({"id": f"j{i}", "text": f"json row {i}"}) + "\n"
                                                    for i in range(3)), encoding="utf-8")
    (tmp_path / "b.csv").write_text(bom + "id,text\nc0,csv row 0\nc1,\"csv, row 1\"\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["run", "--model", "minilm", "--input", tmp_path / "*", "--output", out, "--format", "jsonl"]
    first = bulkinfer(*args, "--accelerator", "type:nvidia-h200;count:1", "--min-ram", "1GB",
                      "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert first.returncode == 0, first.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"], report["units_done"]) == (5, 5, 0, 2)
    records = [json.loads(f.read_text()) for f in out.glob("_committed/*.json")]
    assert sorted((r["rows_in"], r["rows_out"], r["rows_failed"]) for r in records) == [(2, 2, 0), (3, 3, 0)]

    def outputs():
        rows = [json.loads(line) for f in out.glob("part-*.jsonl") for line in f.read_text().splitlines()]
        return {r["id"]: np.array(r["embedding"], np.float32) for r in rows}, len(rows)

    got, n = outputs()
    texts = {"j0": "json row 0", "j1": "json row 1", "j2": "json row 2", "c0": "csv row 0", "c1": "csv, row 1"}
    assert n == 5 and sorted(got) == sorted(texts)
    ids = sorted(texts)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), minilm.embed([texts[i] for i in ids]), atol=1e-5)

    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as f:  # rows appended to one input
        f.write(json.dumps({"id": "j3", "text": "json row 3"}) + "\n")
    second = bulkinfer(*args)
    assert second.returncode == 0, second.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["units_reprocessed"], report["units_skipped"], report["rows_out"]) == (1, 1, 6)
    got, n = outputs()
    assert n == 6 and sorted(got) == sorted([*texts, "j3"])  # j0..j2 once each, j3 new

    other = bulkinfer(*args, "--text-field", "body")
    assert other.returncode == 2
    assert "holds a run with other settings: input_field 'text' (now 'body'); pass --overwrite" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_kill_or_ctrl_c_mid_run_then_rerun_redoes_only_the_unfinished_ranges(tmp_path, minilm, sig):
    from bulkinfer.testing import synthetic_texts

    texts = synthetic_texts(1200, seed=3)
    with open(tmp_path / "in.jsonl", "w") as f:  # one file, cut into ranges of 8 KiB
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--max-length", "64",
           "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--unit-size", "8KiB", "--wave-units", "3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    status, err = kill_after_first_commit(cmd, out, sig=sig)
    committed_at_kill = len(list(out.glob("_committed/*.json")))
    plan = json.loads((out / "_plan.json").read_text())
    assert 1 <= committed_at_kill < len(plan), "the kill must land mid-run for this test to mean anything"
    if sig == signal.SIGINT:  # one line, the shell's status for Ctrl-C, and what was kept
        assert status == 130 and "Traceback" not in err and "ERROR" not in err, err
        assert err.strip().splitlines()[-1] == (f"bulkinfer: interrupted; units committed so far are kept "
                                                f"({committed_at_kill}); rerun the same command to resume")
    else:
        assert status == -signal.SIGKILL

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["units"] == len(plan) and report["units_skipped"] == committed_at_kill
    assert report["units_resumed"] == len(plan) - committed_at_kill and report["units_reprocessed"] == 0
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (len(texts), len(texts), 0)
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().to_pydict()
    ids = table["id"]
    assert sorted(ids) == list(range(len(texts)))  # no loss, no duplicate
    assert report["duplicate_ids"] == 0
    assert not list(out.glob(".tmp-*")) and not list(out.glob("_committed/.tmp-*"))


def test_a_second_ctrl_c_during_the_first_ones_clean_up_exits_130_at_once(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--input",
                             str(ROOT / "data" / "sample" / "*.jsonl"), "--output", str(out)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not (out / "_plan.json").exists() and proc.poll() is None:  # the job's pipeline is starting
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # 130 from main, or SIGINT's own death once the interpreter has reset its handlers (a shell shows 130
    # for both); never an abort (-6, "terminate called") from native code interrupted mid-clean-up.
    # (A first Ctrl-C that lands in a garbage-collector callback is swallowed by Python, which prints
    # "Exception ignored in ..."; the second then stops the command at once.)
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "terminate called" not in err, err
    assert "bulkinfer: interrupted" in err


def test_sizes_are_read_in_bytes_or_binary_units():
    import argparse

    from bulkinfer.cli.args import _size

    assert [_size(v) for v in ("65536", "512KiB", "64MiB", "1GB", "2k")] == [65536, 512 << 10, 64 << 20, 1 << 30, 2048]
    for bad in ("lots", "0", "-5MiB"):
        with pytest.raises(argparse.ArgumentTypeError, match="size"):
            _size(bad)


def test_a_kept_field_an_output_would_overwrite_is_a_bad_setting_not_a_wave_to_resume(tmp_path):
    # digits outputs "label"; keeping the input's "label" beside it cannot work, and no rerun fixes it.
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "pixels": [0] * 64, "label": 3}) + "\n")
    args = ["run", "--model", "digits", "--input", tmp_path / "in.jsonl", "--output", tmp_path / "o"]
    done = bulkinfer(*args, "--keep-fields", "label")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [  # one line: no runner traceback of the bundle before it
        "bulkinfer: error: keep_fields ['label'] would be overwritten by the model's outputs of the same names; "
        "rename those input fields first, or keep other fields"]
    assert not list((tmp_path / "o").iterdir())  # nothing committed, no settings left to refuse the fixed command
    fixed = bulkinfer(*args, "--keep-fields", "id")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "o" / "report.json").read_text())["rows_out"] == 1


def test_a_token_budget_below_the_default_ladder_is_taken_and_zero_is_a_flag_error(tmp_path):
    from bulkinfer.cli.jobs import _budget_bucketing

    # The default ladder reaches 512; a budget of 256 cuts it there (MiniLM's own max length caps it again).
    assert _budget_bucketing(256).lengths[-1] == 256 and _budget_bucketing(256).for_max_length(128).token_budget == 256
    proc = bulkinfer("run", "--model", "minilm", "--input", str(ROOT / "data/sample/part-0.jsonl"),
                     "--output", str(tmp_path / "o"), "--token-budget", "0")
    assert proc.returncode == 2 and "--token-budget: '0' must be > 0" in proc.stderr


@pytest.mark.parametrize("flag, expected", [([], 2), (["--max-in-flight", "0"], 0), (["--max-in-flight", "3"], 3)])
def test_max_in_flight_reaches_text_and_jax_model_specs(flag, expected):
    from bulkinfer.cli import _parser
    from bulkinfer.cli.jobs import _model

    for model in ("minilm", "digits"):
        args, _ = _parser().parse_known_args(["run", "--model", model, "--input", "x", "--output", "y", *flag])
        assert _model(args).max_in_flight == expected


def test_a_negative_max_in_flight_is_a_flag_error(tmp_path):
    proc = bulkinfer("run", "--model", "minilm", "--input", ROOT / "data/sample/part-0.jsonl", "--output",
                     tmp_path / "o", "--max-in-flight=-1")
    assert proc.returncode == 2 and "argument --max-in-flight: '-1' must be >= 0" in proc.stderr


def test_version_names_the_package_version():
    import bulkinfer as package

    done = bulkinfer("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"bulkinfer {package.__version__}"
