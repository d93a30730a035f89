"""The file-to-file job: reconciled counts on messy data, per-file commits, resume after a crash."""

import dataclasses
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkinfer.beam import commit
from bulkinfer.errors import ModelUnavailable
from bulkinfer.models.signature import TEXT, TensorSpec
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
        (2, "field 'text' is null, expected a string"),
        (3, "model failed: RuntimeError: injected failure on a text containing 'boom'"),
        (5, "field 'text' is int, expected a string"),
        (6, "field 'text' is int, expected a string"),
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
    assert cosine(got, minilm.embed(texts)).min() >= 0.99999


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


# Units of work, reconciled commits, outages, changed inputs, hostile rows.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failing:
    """A length model that raises `error` on texts containing `marker`: "unavailable" (a server down past
    its retry budget), "device" (a device that failed), "invalid" (XLA rejecting the rows' input)."""

    name: str = "failing"
    error: str = "unavailable"
    marker: str = "down"
    output_name = "length"

    def load(self):
        return _LoadedFailing(self.error, self.marker)


class _LoadedFailing:
    inputs = (TensorSpec("text", (), TEXT),)
    outputs = (TensorSpec("length", (), "int64"),)
    load_s = 0.0

    def __init__(self, error, marker):
        self._error, self._marker = error, marker

    def predict(self, inputs, stats=None):
        texts = inputs["text"]
        if any(self._marker in t for t in texts):
            import jax

            raise {"unavailable": ModelUnavailable("server http://x:1: infer failed past the retry budget"),
                   "device": jax.errors.JaxRuntimeError("INTERNAL: device lost"),
                   "invalid": jax.errors.JaxRuntimeError("INVALID_ARGUMENT: the row's input")}[self._error]
        return {"length": np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))}


class DropOneRow(beam.DoFn):
    """Loses the first row of every batch read from `name`: the kind of bug a commit must catch."""

    def __init__(self, name):
        self._name = name

    def process(self, batch):
        yield batch.take(range(1, len(batch))) if batch.source.endswith(self._name) else batch


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ids(out: Path) -> list:
    return sorted(i for f in out.glob("part-*.parquet") for i in pq.read_table(f).column("id").to_pylist())


def _records(out: Path) -> dict[str, dict]:
    return {r["source"].rsplit("/", 1)[1]: r for r in commit.committed(str(out)).values()}


def test_a_unit_whose_counts_do_not_reconcile_fails_the_job_and_is_not_committed(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": "x"} for i in range(3)])
    _jsonl(tmp_path / "b.jsonl", [{"id": 10 + i, "text": "y"} for i in range(5)])
    out = tmp_path / "out"
    spec = job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(out), wave_units=1)
    with pytest.raises(job.JobFailed, match=r"b\.jsonl\): rows_in 5 != rows_out 4 \+ rows_failed 0") as e:
        job.run(CountingModel(), spec, transform=beam.ParDo(DropOneRow("b.jsonl")))
    assert "wave 2 of 2" in str(e.value) and "rerun the same command" in str(e.value)
    assert list(_records(out)) == ["a.jsonl"] and _ids(out) == [0, 1, 2]  # b: nothing committed
    report = job.run(CountingModel(), spec)  # the bug fixed, the rerun does only b
    assert (report["units_skipped"], report["units_resumed"], report["units_done"]) == (1, 1, 2)
    assert report["reconciled"] and _ids(out) == [0, 1, 2, *range(10, 15)]


def test_the_cli_exits_1_when_counts_do_not_reconcile(tmp_path, monkeypatch, capsys):
    from bulkinfer import cli
    from bulkinfer.cli import jobs as cli_jobs

    _jsonl(tmp_path / "b.jsonl", [{"id": i, "text": "y"} for i in range(5)])
    run = job.run
    monkeypatch.setattr(cli_jobs, "_model", lambda args: CountingModel())  # the _model that _job_model calls
    monkeypatch.setattr(job, "run", lambda *a, **k: run(*a, transform=beam.ParDo(DropOneRow("b.jsonl")), **k))
    code = cli.main(["run", "--model", "minilm", "--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "o")])
    assert code == 1
    assert "rows_in 5 != rows_out 4 + rows_failed 0" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("_committed/*.json")) and not list((tmp_path / "o").glob("part-*"))


def test_an_outage_fails_the_job_commits_nothing_as_failed_and_a_rerun_finishes(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": "fine"} for i in range(4)])
    _jsonl(tmp_path / "b.jsonl", [{"id": 10 + i, "text": "down" if i == 2 else "fine"} for i in range(4)])
    out = tmp_path / "out"
    spec = job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(out), wave_units=1)
    with pytest.raises(job.JobFailed, match="ModelUnavailable: server http://x:1"):
        job.run(Failing(error="unavailable"), spec)
    assert list(_records(out)) == ["a.jsonl"] and not list(out.glob("failed-*"))
    report = job.run(Failing(marker="no such text"), spec)  # the server is back
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (8, 8, 0)
    assert (report["units_skipped"], report["units_resumed"]) == (1, 1)
    assert _ids(out) == [0, 1, 2, 3, 10, 11, 12, 13] and not list(out.glob("failed-*"))


def test_a_failed_device_fails_the_job_but_an_invalid_input_costs_only_its_row(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": "down" if i == 5 else "ok"} for i in range(9)])
    with pytest.raises(job.JobFailed, match="INTERNAL: device lost"):
        job.run(Failing(error="device"), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o1")))
    assert not list((tmp_path / "o1").glob("_committed/*.json"))
    report = job.run(Failing(error="invalid"), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o2")))
    assert (report["rows_out"], report["rows_failed"]) == (8, 1)
    (letter,) = [json.loads(line) for f in (tmp_path / "o2").glob("failed-*.jsonl") for line in f.read_text().splitlines()]
    assert letter["id"] == 5 and "INVALID_ARGUMENT" in letter["error"]


def test_a_job_whose_rows_fail_systemically_stops(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "body": "the text is under another field"} for i in range(1200)])
    out = tmp_path / "out"
    with pytest.raises(job.JobFailed, match="1200 of 1200 rows failed .* --max-failed-fraction 0.5") as failure:
        job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out)))
    assert "for example: " in str(failure.value) and "field 'text' is missing" in str(failure.value)
    assert "rerun the same command" not in str(failure.value)  # the same command would fail the same way
    assert not list(out.glob("_committed/*.json")) and not list(out.glob("failed-*"))
    assert not (out / "_job.json").exists()  # so the corrected command is not refused as "other settings"
    fixed = job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out), input_field="body")
    assert job.run(CountingModel(), fixed)["rows_out"] == 1200
    out = tmp_path / "out-again"
    small = job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o2"), min_rows_for_failed_fraction=1201)
    with pytest.raises(job.JobFailed, match="1200 of 1200 rows failed"):  # a small job all of whose rows fail
        job.run(CountingModel(), small)
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write(json.dumps({"id": "ok", "text": "one good row"}) + "\n")
    small = dataclasses.replace(small, output=str(tmp_path / "o3"), min_rows_for_failed_fraction=1202)
    assert job.run(CountingModel(), small)["rows_failed"] == 1200  # too few rows to judge: dead letters
    never = job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out), max_failed_fraction=1.0)
    assert job.run(CountingModel(), never)["rows_failed"] == 1200


def test_an_edited_input_is_reprocessed_and_its_old_outputs_replaced(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": "x" * i} for i in range(5)])
    _jsonl(tmp_path / "b.jsonl", [{"id": 100, "text": "b"}])
    out = tmp_path / "out"
    spec = job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(out))
    job.run(CountingModel(), spec)
    before = _records(out)["a.jsonl"]
    with open(tmp_path / "a.jsonl", "a") as f:  # rows appended
        f.write("".join(json.dumps({"id": i, "text": "x" * i}) + "\n" for i in range(5, 8)))
    report = job.run(CountingModel(), spec)
    assert (report["units_reprocessed"], report["units_skipped"], report["units_resumed"]) == (1, 1, 0)
    assert (report["rows_in"], report["rows_out"], report["duplicate_ids"]) == (9, 9, 0)
    assert _ids(out) == [*range(8), 100]  # the old outputs of a are gone, not duplicated
    after = _records(out)["a.jsonl"]
    assert after["fingerprint"] != before["fingerprint"] and after["rows_in"] == 8
    again = job.run(CountingModel(), spec)
    assert (again["units_reprocessed"], again["units_skipped"]) == (0, 2)


def test_rows_without_an_id_are_dead_letters_unless_allowed(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "a"}, {"id": None, "text": "b"}, {"text": "c"}])
    report = job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o1")))
    assert (report["rows_out"], report["rows_failed"]) == (1, 2)
    letters = [json.loads(line) for f in (tmp_path / "o1").glob("failed-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(d["position"] for d in letters) == [2, 3]
    assert all("field 'id' (the id) is missing or null" in d["error"] and "unit" not in d for d in letters)
    allowed = job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o2"), allow_missing_ids=True)
    assert job.run(CountingModel(), allowed)["rows_out"] == 3


def test_an_output_folder_of_unrelated_files_is_named_in_a_warning_and_kept(tmp_path, caplog):
    _jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "a"}])
    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", "photo.png", "data.csv", "z.bin"):
        (out / name).write_text("mine")
    with caplog.at_level("WARNING", logger="bulkinfer.tasks.run"):
        report = job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out)))
    assert report["rows_out"] == 1
    warned = [r.getMessage() for r in caplog.records if "no bulkinfer run wrote" in r.getMessage()]
    assert len(warned) == 1 and "(data.csv, notes.txt, photo.png, ...)" in warned[0]
    assert all((out / name).read_text() == "mine" for name in ("notes.txt", "photo.png", "data.csv", "z.bin"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="bulkinfer.tasks.run"):  # a rerun finds its own run there: no warning
        job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "a.jsonl"), output=str(out)))
    assert not [r for r in caplog.records if "no bulkinfer run wrote" in r.getMessage()]


def test_duplicate_ids_are_counted(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": "a"} for i in range(300)])
    _jsonl(tmp_path / "b.jsonl", [{"id": i, "text": "b"} for i in range(250, 310)] + [{"id": "7", "text": "c"}])
    report = job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(tmp_path / "o")))
    assert report["duplicate_ids"] == 51  # 250..299 twice; "7" (text) and 7 (a number) are one id


def test_two_processes_with_an_accelerator_hint_commit_every_unit_reconciled(tmp_path):
    for k in range(3):
        _jsonl(tmp_path / f"in-{k}.jsonl", [{"id": f"{k}-{i}", "text": "x" * (i % 17)} for i in range(400)])
    out = tmp_path / "out"
    spec = job.JobSpec(input=str(tmp_path / "*.jsonl"), output=str(out), unit_size=2048,
                       accelerator="type:nvidia-h200;count:1", min_ram="1GB")
    report = job.run(CountingModel(name="hinted"), spec,
                     ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    records = list(commit.committed(str(out)).values())
    assert report["units"] == len(records) > 3 and report["reconciled"] and report["rows_out"] == 1200
    assert all(r["rows_in"] == r["rows_out"] + r["rows_failed"] for r in records)
    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().to_pydict()
    assert sorted(zip(table["id"], table["length"])) == sorted(
        (f"{k}-{i}", i % 17) for k in range(3) for i in range(400))


def _big_jsonl(path, rows: int) -> None:
    """rows JSONL rows {"id": i, "text": "x" * (i % 7)}: one large input file."""
    with open(path, "w") as f:
        f.writelines(f'{{"id": {i}, "text": "{"x" * (i % 7)}"}}\n' for i in range(rows))


@pytest.mark.slow
def test_one_200k_row_file_is_split_across_workers(tmp_path):
    rows = 200_000
    _big_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    spec = job.JobSpec(input=str(tmp_path / "big.jsonl"), output=str(out), unit_size=512 << 10, batch_rows=4096)
    report = job.run(CountingModel(name="big"), spec, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    records = list(commit.committed(str(out)).values())
    assert report["units"] == len(records) >= 8 and report["reconciled"]
    assert len({r["read_by"] for r in records}) == 2  # both worker processes read ranges of the one file
    assert sorted((r["start"], r["stop"]) for r in records)[0][0] == 0
    ids = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read(columns=["id"]).column("id")
    assert len(ids) == rows and len(np.unique(ids.to_numpy())) == rows and report["duplicate_ids"] == 0


@pytest.mark.slow
def test_a_kill_during_a_200k_row_file_resumes_only_its_unfinished_ranges(tmp_path):
    import sys

    from bulkinfer.testing import kill_after_first_commit

    rows = 200_000
    _big_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    settings = dict(input=str(tmp_path / "big.jsonl"), output=str(out), unit_size=512 << 10, wave_units=2)
    code = ("from bulkinfer.tasks import run; from bulkinfer.testing import CountingModel; "
            f"run.run(CountingModel(name='big'), run.JobSpec(**{settings!r}))")
    kill_after_first_commit([sys.executable, "-c", code], out)
    done_at_kill = {r["key"] for r in commit.committed(str(out)).values()}
    report = job.run(CountingModel(name="big"), job.JobSpec(**settings))
    assert 1 <= len(done_at_kill) < report["units"], "the kill must land mid-run for this test to mean anything"
    assert (report["units_skipped"], report["units_resumed"]) == (len(done_at_kill), report["units"] - len(done_at_kill))
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (rows, rows, 0)
    ids = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read(columns=["id"]).column("id")
    assert len(ids) == rows and len(np.unique(ids.to_numpy())) == rows  # every id once


def test_glob_characters_in_input_and_output_names_are_plain_characters(tmp_path):
    data = tmp_path / "in[1]"
    data.mkdir()
    (data / "a[x]*.jsonl").write_text("".join(f'{{"id": {i}, "text": "{"y" * i}"}}\n' for i in range(5)))
    out = tmp_path / "out[2]"
    spec = job.JobSpec(input=str(tmp_path / "in[[]1]" / "a[[]x]*.jsonl"), output=str(out))  # globs escaped
    first = job.run(CountingModel(), spec)
    assert (first["rows_in"], first["rows_out"], first["units_done"]) == (5, 5, 1)
    again = job.run(CountingModel(), spec)  # the commit record is found: nothing is redone
    assert (again["units_skipped"], again["rows_out"]) == (1, 5)
    assert sorted(pq.read_table(next(out.glob("part-*.parquet"))).column("length").to_pylist()) == list(range(5))
