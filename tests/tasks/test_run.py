"""The file-to-file job: reconciled counts on messy data, per-file commits, resume after a crash."""

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkinfer.beam import commit
from bulkinfer.tasks import run as job
from bulkinfer.testing import CountingModel, cosine

ROOT = Path(__file__).resolve().parents[1]

GOOD = st.builds(lambda i, t: json.dumps({"id": i, "text": t}), st.integers(), st.text(max_size=30))
BAD = st.one_of(
    st.just('{"id": 1, "text": '),                                   # malformed JSON
    st.builds(lambda i: json.dumps({"id": i}), st.integers()),       # missing field
    st.builds(lambda v: json.dumps({"id": 0, "text": v}),           # null / number / list / object
              st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers()),
                        st.dictionaries(st.text(max_size=3), st.integers()))),
    st.just("[1, 2, 3]"),                                            # not an object
    st.builds(lambda t: json.dumps({"id": 2, "text": "boom " + t}), st.text(max_size=5)),  # model fails
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(st.tuples(st.booleans(), st.data()), max_size=40), min_size=1, max_size=3),
       data=st.data())
def test_counts_reconcile_on_generated_messy_datasets(tmp_path_factory, files, data):
    root = tmp_path_factory.mktemp("messy")
    good = bad = 0
    for k, lines in enumerate(files):
        with open(root / f"in-{k}.jsonl", "w", encoding="utf-8") as f:
            for is_good, _ in lines:
                f.write(data.draw(GOOD if is_good else BAD) + "\n")
                good, bad = good + is_good, bad + (not is_good)
    out = root / "out"
    report = job.run(CountingModel(fail_on="boom"), job.JobSpec(input=str(root / "*.jsonl"), output=str(out)))
    assert report["reconciled"]
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (good + bad, good, bad)
    tables = [pq.read_table(f) for f in out.glob("part-*.parquet")]
    assert all(t.column_names == ["id", "length"] for t in tables)
    written = sum(t.num_rows for t in tables)
    letters = [json.loads(line) for f in out.glob("failed-*.jsonl") for line in f.read_text().splitlines()]
    assert (written, len(letters)) == (good, bad)
    assert all(d["stage"] in ("read", "inference") and d["source"] and d["error"] for d in letters)
    assert report["files_done"] == report["files"] == len(files)


def test_empty_files_and_wrong_schema_parquet_are_accounted_for(tmp_path):
    import pyarrow as pa

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.csv").write_text("")
    pq.write_table(pa.table({"id": [1, 2], "body": ["no text column", "here"]}), tmp_path / "wrong.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    report = job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "*"), output=str(tmp_path / "out")))
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (3, 0, 3)
    assert report["reconciled"] and report["files_done"] == 4
    errors = sorted(json.loads(line)["error"] for f in (tmp_path / "out").glob("failed-*.jsonl")
                    for line in f.read_text().splitlines())
    assert "not a readable Parquet file" in errors[0]
    assert [e.split(": ", 1)[1] for e in errors[1:]] == ["field 'text' is missing"] * 2


def _write_inputs(directory: Path, files: dict[str, list[dict]], fmt: str) -> str:
    import pyarrow as pa

    directory.mkdir()
    for name, rows in files.items():
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), directory / f"{name}.parquet")
        else:
            (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory / f"*.{fmt}")


def _outputs(out: Path):
    """(predictions sorted by id, dead letters as (id, stage, error after 'where', record, position))."""
    import pyarrow as pa

    table = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))).sort_by("id")
    letters = sorted((d["id"], d["stage"], d["error"].split(": ", 1)[1], d["record"], d["position"])
                     for f in out.glob("failed-*.jsonl") for d in map(json.loads, f.read_text().splitlines()))
    return table, letters


def test_parquet_and_jsonl_inputs_give_the_same_outputs_and_dead_letters(tmp_path):
    files = {
        "a": [{"id": 1, "text": "one"}, {"id": 2, "text": None}, {"id": 3, "text": "boom three"},
              {"id": 4, "text": "four"}],
        "b": [{"id": 5, "text": 5}, {"id": 6, "text": 6}],  # an int column
        "c": [{"id": 7, "body": "no text"}],  # no text column
        "d": [{"id": 8, "text": "eight"}, {"id": 9, "text": "nine!"}],
    }
    results = {}
    for fmt in ("parquet", "jsonl"):
        pattern = _write_inputs(tmp_path / fmt, files, fmt)
        report = job.run(CountingModel(fail_on="boom"), job.JobSpec(input=pattern, output=str(tmp_path / f"out-{fmt}")))
        assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (9, 4, 5) and report["reconciled"]
        results[fmt] = _outputs(tmp_path / f"out-{fmt}")
    (table, letters), (jsonl_table, jsonl_letters) = results["parquet"], results["jsonl"]
    assert table.equals(jsonl_table) and letters == jsonl_letters
    assert table.to_pydict() == {"id": [1, 4, 8, 9], "length": [3, 4, 5, 5]}
    assert [(d[0], d[2]) for d in letters] == [
        (2, "field 'text' is null, expected str"),
        (3, "model failed: RuntimeError: injected failure on a text containing 'boom'"),
        (5, "field 'text' is int, expected str"),
        (6, "field 'text' is int, expected str"),
        (7, "field 'text' is missing"),
    ]


def test_parquet_and_jsonl_inputs_give_the_same_embeddings(tmp_path, minilm_spec, minilm):
    texts = ["a short one", "", "a somewhat longer sentence about bulk inference on Beam", "café ☕"]
    files = {"a": [{"id": i, "text": t} for i, t in enumerate(texts)], "b": [{"id": 9, "text": None}]}
    results = {}
    for fmt in ("parquet", "jsonl"):
        pattern = _write_inputs(tmp_path / fmt, files, fmt)
        job.run(minilm_spec, job.JobSpec(input=pattern, output=str(tmp_path / f"out-{fmt}")))
        results[fmt] = _outputs(tmp_path / f"out-{fmt}")
    (table, letters), (jsonl_table, jsonl_letters) = results["parquet"], results["jsonl"]
    assert table.schema == jsonl_table.schema and letters == jsonl_letters
    assert table.column("id").to_pylist() == [0, 1, 2, 3] and len(letters) == 1
    got = np.array(table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(got, np.array(jsonl_table.column("embedding").to_pylist(), np.float32), atol=1e-6)
    assert cosine(got, minilm.predict(texts)).min() >= 0.99999


def test_uncommitted_outputs_are_removed_and_committed_ones_kept(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
    out = tmp_path / "out"
    job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out)))
    committed_files = sorted(p.name for p in out.glob("part-*"))
    (out / "part-0123456789abcdef-00000.parquet").write_bytes(b"left by a killed run")
    (out / ".tmp-part-0123456789abcdef-00001.parquet").write_bytes(b"half")
    removed = commit.remove_uncommitted(str(out))
    assert sorted(Path(p).name for p in removed) == [".tmp-part-0123456789abcdef-00001.parquet",
                                                     "part-0123456789abcdef-00000.parquet"]
    assert sorted(p.name for p in out.glob("part-*")) == committed_files


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_row_exactly_once(tmp_path, minilm):
    from bulkinfer.testing import synthetic_texts

    texts = synthetic_texts(2400, seed=3)
    n_files = 12
    for k in range(n_files):
        with open(tmp_path / f"in-{k:02d}.jsonl", "w") as f:
            for i in range(k, len(texts), n_files):
                f.write(json.dumps({"id": i, "text": texts[i]}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--input", str(tmp_path / "in-*.jsonl"),
           "--output", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(out.glob("_committed/*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed_at_kill = len(list(out.glob("_committed/*.json")))
    assert 2 <= committed_at_kill < n_files, "the kill must land mid-run for this test to mean anything"
    for f in out.glob("part-*.parquet"):  # whatever has a final name is a complete file
        pq.read_metadata(f)

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["units_skipped"] == committed_at_kill
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (len(texts), len(texts), 0)
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().to_pydict()
    ids = table["id"]
    assert sorted(ids) == list(range(len(texts)))  # no loss, no duplicate
    got = np.array(table["embedding"], np.float32)
    expected = minilm.predict([texts[i] for i in ids])
    assert cosine(got, expected).min() >= 0.99999
    assert not list(out.glob(".tmp-*")) and not list(out.glob("_committed/.tmp-*"))


def test_multi_process_embedded_runner_commits_every_file(tmp_path):
    for k in range(4):
        (tmp_path / f"in-{k}.jsonl").write_text(
            "".join(json.dumps({"id": f"{k}-{i}", "text": "x" * i}) + "\n" for i in range(50)))
    out = tmp_path / "out"
    loads_here = CountingModel.loads
    report = job.run(CountingModel(name="multi-process"), job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(out)),
                     ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert CountingModel.loads == loads_here  # the model was loaded in the worker processes, not here
    assert report["reconciled"] and report["files_done"] == 4 and report["rows_out"] == 200
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().to_pydict()
    assert sorted(zip(table["id"], table["length"])) == sorted((f"{k}-{i}", i) for k in range(4) for i in range(50))
