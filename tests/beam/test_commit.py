"""The commit step alone: temporaries renamed, orphans of retried bundles deleted, a retried commit ignored."""

import json

import pytest

from bulkinfer.beam import commit, io


def _summary(unit, parts, rows):
    return {"unit": unit, "read_by": "host:1", "rows_in": rows, "rows_out": rows, "rows_failed": 0,
            "parts": parts, "failed": []}


def test_commit_renames_the_reported_temporaries_and_deletes_orphans(tmp_path):
    unit = io.Unit(source="/data/a.jsonl", fingerprint="3:1.0")
    reported = tmp_path / f".tmp-part-{unit.key}-aaaa.jsonl"
    orphan = tmp_path / f".tmp-part-{unit.key}-bbbb.jsonl"  # a bundle attempt the runner retried
    other = tmp_path / ".tmp-part-0000000000000000-cccc.jsonl"  # another unit's: not touched
    for f in (reported, orphan, other):
        f.write_text('{"id": 1}\n')
    step = commit._CommitUnit(str(tmp_path), "jsonl", commit.FailureLimit())
    step.setup()
    (record,) = step.process(_summary(unit, [str(reported)], 1), totals=(1, 0))
    assert record["files"] == [f"part-{unit.key}-00000.jsonl"] and record["fingerprint"] == "3:1.0"
    assert (tmp_path / record["files"][0]).read_text() == '{"id": 1}\n'
    assert not reported.exists() and not orphan.exists() and other.exists()
    assert json.loads((tmp_path / "_committed" / f"{unit.key}.json").read_text()) == record
    # A retried commit of the same unit finds the record: its new temporaries are dropped, nothing changes.
    again = tmp_path / f".tmp-part-{unit.key}-dddd.jsonl"
    again.write_text('{"id": 1}\n')
    assert list(step.process(_summary(unit, [str(again)], 1), totals=(1, 0))) == []
    assert not again.exists() and commit.committed(str(tmp_path)) == {unit.key: record}


def test_counts_that_do_not_reconcile_name_the_unit_and_the_numbers():
    unit = io.Unit(source="/data/a.jsonl", start=0, stop=100)
    reports = [("read", 10, 1, unit, "host:1"), ("part", "/o/.tmp-part-x", 8), ("failed", "/o/.tmp-failed-y", 1)]
    with pytest.raises(commit.UnitNotReconciled, match=r"a.jsonl bytes 0-100\): rows_in 11 != rows_out 8 \+ "
                                                        r"rows_failed 1"):
        commit._reconcile((unit.key, reports))
    assert commit._reconcile((unit.key, reports + [("part", "/o/.tmp-part-z", 2)]))["rows_out"] == 10


def test_failure_limit_needs_enough_rows_and_counts_earlier_ones():
    limit = commit.FailureLimit(max_fraction=0.5, min_rows=100, prior_rows=60, prior_failed=30)
    limit.check(39, 39)  # 99 rows seen: too few to judge
    limit.check(40, 20)  # 50 of 100: not more than half
    with pytest.raises(commit.TooManyFailures, match="51 of 100 rows failed"):
        limit.check(40, 21)
    with pytest.raises(ValueError, match="within"):
        commit.FailureLimit(max_fraction=1.5)


def test_a_bundle_buffers_a_bounded_number_of_bytes_over_all_its_units(tmp_path, monkeypatch):
    from bulkinfer.beam.batch import Batch

    monkeypatch.setattr(commit, "BYTES_PER_FILE", 500)  # a 3-row batch of {"id": "k-i"} counts 201 bytes
    writer = commit._WriteUnitParts(str(tmp_path), "jsonl", ["id"], rows_per_file=5)
    writer.setup()
    writer.start_bundle()
    reports = []
    for k in range(6):  # 3 rows each, units alternating
        reports += writer.process(Batch([{"id": f"{k}-{i}"} for i in range(3)], unit="ab"[k % 2]))
        assert sum(w.buffered_bytes for w in writer._writers.values()) < 500
    reports += [wv.value for wv in writer.finish_bundle()]
    # Each unit's file ends once it holds 5 rows or more (two batches), the rest ends with the bundle.
    assert sorted((unit, n) for unit, (_, _, n) in reports) == [("a", 3), ("a", 6), ("b", 3), ("b", 6)]
    written = sorted(json.loads(line)["id"] for _, (_, temp, _) in reports for line in open(temp))
    assert written == sorted(f"{k}-{i}" for k in range(6) for i in range(3))


def test_a_record_still_being_written_is_not_a_commit(tmp_path):
    # A crash between creating a record's temporary file and renaming it leaves `.tmp-<key>.json`,
    # empty or partial; it matches "*.json", yet it is no commit and must not break a resume.
    records = tmp_path / commit.COMMITTED
    records.mkdir()
    (records / ".tmp-unit-a.json").write_text("")
    (records / "unit-b.json").write_text(json.dumps({"key": "unit-b", "rows_in": 3}))
    assert commit.committed(str(tmp_path)) == {"unit-b": {"key": "unit-b", "rows_in": 3}}


def test_duplicate_ids_counted_in_process_and_by_a_pipeline_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    pq.write_table(pa.table({"key": [str(i) for i in range(40)] + [None]}), tmp_path / "part-a-00000.parquet")
    (tmp_path / "part-b-00000.jsonl").write_text("".join(json.dumps({"key": i}) + "\n" for i in range(30, 50)))
    (tmp_path / "failed-b-00000.jsonl").write_text(json.dumps({"id": 7}) + "\n" + json.dumps({"id": None}) + "\n")
    paths = [str(tmp_path / n) for n in ("part-a-00000.parquet", "part-b-00000.jsonl", "failed-b-00000.jsonl")]
    # Output rows keep the id under `key`, dead letters under "id"; "7" and 7 are one id; nulls are not ids.
    expected = 10 + 1  # 30..39 twice, and 7
    assert commit.count_duplicate_ids(paths, "key") == expected
    assert commit.count_duplicate_ids(paths, "key", runner=FnApiRunner(), buckets=4) == expected
    assert commit.count_duplicate_ids([], "key") == 0
