import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from bulkinfer.beam import commit, io, writers
from bulkinfer.beam.batch import Batch


def _run(build):
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(flags=[])) as p:
        build(p)


def _rows(batches):
    return [(r["id"], r["text"]) for b in batches for r in b.rows]


def test_reads_jsonl_parquet_and_csv_by_extension(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "text": "one"}\n\n{"id": 2, "text": "two"}\n')
    pq.write_table(pa.table({"id": [3, 4], "text": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text('id,text\n5,"five, with a comma"\n6,six\n')
    expected = [(1, "one"), (2, "two"), (3, "three"), (4, "four"), ("5", "five, with a comma"), ("6", "six")]

    def check(batches):
        assert all(isinstance(b, Batch) and b.source for b in batches)
        assert sorted(_rows(batches), key=str) == sorted(expected, key=str)

    _run(lambda p: assert_that(p | io.ReadDataset(str(tmp_path / "*")), check))


def test_batches_are_bounded_and_positions_are_line_numbers(tmp_path):
    lines = [json.dumps({"id": i, "text": f"t{i}"}) for i in range(25)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")

    def check(batches):
        assert sorted(len(b) for b in batches) == [5, 10, 10]
        assert sorted(p for b in batches for p in b.positions) == list(range(1, 26))

    _run(lambda p: assert_that(p | io.ReadDataset(str(tmp_path / "a.jsonl"), batch_rows=10), check))


def test_parquet_is_read_as_arrow_tables_with_row_numbers(tmp_path):
    pq.write_table(pa.table({"id": list(range(25)), "text": [f"t{i}" for i in range(25)]}), tmp_path / "a.parquet")

    def check(batches):
        assert all(b.table is not None and b.table.column_names == ["id", "text"] for b in batches)
        assert sorted(len(b) for b in batches) == [5, 10, 10]
        assert sorted(p for b in batches for p in b.positions) == list(range(1, 26))
        assert sorted(_rows(batches)) == [(i, f"t{i}") for i in range(25)]

    _run(lambda p: assert_that(p | io.ReadDataset(str(tmp_path / "a.parquet"), batch_rows=10), check))


def test_unreadable_records_become_dead_letters_naming_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"id": 1, "text": "ok"}\n{"id": 2, "text": \n[1, 2]\n{"id": 4, "text": "caf\xe9"}\n{"id": 5, "text": "ok"}\n')
    (tmp_path / "b.csv").write_text("id,text\n1,ok\n2,too,many\n")

    def build(p):
        rows, failed = p | io.ReadDataset(str(tmp_path / "*")).with_exception_handling()
        assert_that(rows | beam.FlatMap(lambda b: _rows([b])), equal_to([(1, "ok"), (5, "ok"), ("1", "ok")]), label="rows")
        assert_that(failed | beam.Map(lambda d: (d["stage"], d["position"], d["error"].split(": ", 1)[1])),
                    equal_to([
                        ("read", 2, "malformed JSON (Expecting value at character 19)"),
                        ("read", 3, "expected a JSON object, got list"),
                        ("read", 4, "invalid UTF-8 at byte 22"),
                        ("read", 3, "3 columns, the header has 2"),
                    ]), label="failed")

    _run(build)


def test_no_matching_file_and_unknown_extension_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input file matches"):
        io.ReadDataset(str(tmp_path / "*.jsonl"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"a.txt: unknown input format"):
        io.ReadDataset(str(tmp_path / "*"))
    with pytest.raises(ValueError, match="unknown output format 'xml'"):
        io.WriteDataset(str(tmp_path), format="xml")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_round_trips_rows_and_batches_with_vectors(tmp_path, fmt):
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch = Batch([{"id": i, "v": vectors[i], "extra": "x"} for i in range(3)])
    row = {"id": 3, "v": vectors[3], "extra": "x"}
    _run(lambda p: p | beam.Create([batch, row]) | io.WriteDataset(str(tmp_path / "out"), format=fmt,
                                                                   columns=["id", "v"]))
    files = sorted((tmp_path / "out").iterdir())
    assert files and all(f.name.startswith("part-") and f.suffix == f".{fmt}" for f in files)
    if fmt == "parquet":
        table = pa.concat_tables(pq.read_table(f) for f in files)
        assert table.column_names == ["id", "v"]
        assert pa.types.is_fixed_size_list(table.schema.field("v").type)
        got = {r["id"]: r["v"] for r in table.to_pylist()}
    else:
        got = {r["id"]: r["v"] for f in files for r in map(json.loads, f.read_text().splitlines())}
    assert sorted(got) == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.array([got[i] for i in range(4)], np.float32), vectors)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_gives_the_same_file_from_table_batches_as_from_dict_rows(tmp_path, fmt):
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    table = pa.table({"id": [0, 1, 2, 3], "v": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3),
                      "extra": ["x", "y", None, "z"]})
    columns = ["id", "v", "absent"]  # a column no row has is written as nulls

    def written(name, elements):
        _run(lambda p: p | beam.Create(elements) | io.WriteDataset(str(tmp_path / name), format=fmt, columns=columns))
        files = sorted((tmp_path / name).iterdir())
        if fmt == "parquet":
            return pa.concat_tables(pq.read_table(f) for f in files).sort_by("id")
        return sorted((json.loads(line) for f in files for line in f.read_text().splitlines()), key=lambda r: r["id"])

    from_dicts = written("dicts", [Batch([{"id": i, "v": vectors[i], "extra": "x"} for i in range(4)])])
    from_table = written("table", [Batch(table)])
    mixed = written("mixed", [Batch(table.slice(0, 2)), Batch([{"id": 2, "v": vectors[2]}]), {"id": 3, "v": vectors[3]}])
    if fmt == "parquet":
        assert from_table.column_names == columns and from_table.column("absent").null_count == 4
        assert from_table.equals(from_dicts) and mixed.equals(from_dicts)
    else:
        assert from_table == from_dicts == mixed
        assert from_table[1] == {"id": 1, "v": [3.0, 4.0, 5.0], "absent": None}


def test_shard_buffer_falls_back_to_one_table_when_column_types_differ_between_batches(tmp_path):
    buf = writers.ShardBuffer(None)
    buf.add(Batch(pa.table({"id": [1, 2]})))
    buf.add(Batch(pa.table({"id": ["three"]})))
    assert len(buf) == 3
    final = str(tmp_path / "part-0.parquet")
    writers.commit(buf.write_temp(final, "parquet"), final)
    assert len(buf) == 0
    assert pq.read_table(final).column("id").to_pylist() == ["1", "2", "three"]  # as rows_to_table does


def test_vectors_are_written_without_a_dictionary_and_other_columns_with_one(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    table = pa.table({"id": [1, 2, 1, 2], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 3)})
    final = str(tmp_path / "part-0.parquet")
    writers.commit(writers.write_temp(final, table, "parquet"), final)
    back = pq.read_table(final)
    assert back.equals(table)
    group = pq.ParquetFile(final).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["id"])
    assert not any("DICTIONARY" in e for e in encodings["embedding.list.element"])


def test_estimate_rows_counts_lines_and_parquet_metadata(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n{}\n{}\n")
    (tmp_path / "b.csv").write_text("id\n1\n2\n")
    pq.write_table(pa.table({"id": list(range(7))}), tmp_path / "c.parquet")
    assert io.estimate_rows(io.match_files(str(tmp_path / "*"))) == 3 + 2 + 7


def test_one_bad_byte_in_a_csv_costs_only_its_row(tmp_path):
    data = ("id,text\n" + "".join(f"{i},row {i}\n" for i in range(2000))).encode()
    at = data.index(b"row 1500")
    (tmp_path / "a.csv").write_bytes(data[:at] + b"\xff" + data[at:])

    def build(p):
        rows, failed = p | io.ReadDataset(str(tmp_path / "a.csv")).with_exception_handling()
        assert_that(rows | beam.Map(len) | beam.CombineGlobally(sum), equal_to([1999]), label="rows")
        assert_that(failed | beam.Map(lambda d: (d["position"], d["error"].split(": ", 1)[1])),
                    equal_to([(1502, "invalid UTF-8")]), label="failed")

    _run(build)


def _read_unit(unit, batch_rows=7):
    """(rows as (position, row), dead letters, counts) of one unit, read without a pipeline."""
    rows, letters, counts = [], [], []
    for out in io._ReadUnit(batch_rows).process(unit):
        if isinstance(out, Batch):
            assert out.unit == unit.key and out.source == unit.source
            rows.extend(zip(out.positions, out.rows))
        elif out.tag == io.FAILED:
            letters.append(out.value)
        else:
            counts.append(out.value)
    return rows, letters, counts


@pytest.mark.parametrize("unit_size", [1, 10, 37, 100, 10_000])
def test_jsonl_ranges_hold_every_line_once_with_its_line_number(tmp_path, unit_size):
    lines = [json.dumps({"id": i, "text": "x" * (i % 13)}) for i in range(60)]
    lines[7], lines[31] = "", "not json"  # a blank line and a bad one, to check numbering around them
    (tmp_path / "a.jsonl").write_text("\n".join(lines))  # no newline after the last line
    units = io.plan_units([str(tmp_path / "a.jsonl")], unit_size)
    size = (tmp_path / "a.jsonl").stat().st_size
    assert (len(units) == 1) == (unit_size >= size)
    data = (tmp_path / "a.jsonl").read_bytes()
    for unit in units[1:]:
        assert data[unit.start - 1:unit.start] == b"\n"  # each range starts at the beginning of a line
        assert unit.first == data[:unit.start].count(b"\n") + 1
    assert len({u.key for u in units}) == len(units)
    rows, letters, counts = [], [], []
    for unit in units:
        r, d, c = _read_unit(unit)
        assert [(k, v[:4]) for k, v in c] == [(unit.key, ("read", len(r), len(d), unit))]  # once per unit
        rows += r
        letters += d
        counts += c
    expected = [(n, json.loads(line)) for n, line in enumerate(lines, 1) if line and line != "not json"]
    assert sorted(rows, key=lambda pr: pr[0]) == expected
    assert [(d["position"], d["unit"] in {u.key for u in units}) for d in letters] == [(32, True)]


def test_parquet_splits_into_runs_of_row_groups_with_row_numbers(tmp_path):
    table = pa.table({"id": list(range(100)), "text": [f"t{i}" for i in range(100)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    group_bytes = pq.read_metadata(tmp_path / "a.parquet").row_group(0).total_byte_size
    units = io.plan_units([str(tmp_path / "a.parquet")], unit_size=2 * group_bytes)
    assert [(u.start, u.stop, u.first) for u in units] == [(0, 2, 1), (2, 4, 21), (4, 6, 41), (6, 8, 61),
                                                            (8, None, 81)]
    rows = [pr for u in units for pr in _read_unit(u)[0]]
    assert sorted((pos, r["id"]) for pos, r in rows) == [(i + 1, i) for i in range(100)]
    assert len(io.plan_units([str(tmp_path / "a.parquet")])) == 1  # the default unit size: one unit


def test_csv_is_never_split_and_quoted_newlines_stay_in_their_row(tmp_path):
    rows = [(i, f"line one of {i}\nline two, quoted") for i in range(50)]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(rows)
    units = io.plan_units([str(tmp_path / "a.csv")], unit_size=64)
    assert len(units) == 1
    got, letters, _ = _read_unit(units[0])
    assert not letters and [(int(r["id"]), r["text"]) for _, r in got] == rows


def test_a_byte_order_mark_is_skipped_in_jsonl_and_csv(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"id": "j1", "text": "one"}\n{"id": "j2", "text": "two"}\n')
    (tmp_path / "b.csv").write_bytes(bom + b"id,text\nc1,one\nc2,two\n")
    for name, ids in (("a.jsonl", ["j1", "j2"]), ("b.csv", ["c1", "c2"])):
        (unit,) = io.plan_units([str(tmp_path / name)])
        rows, letters, _ = _read_unit(unit)
        assert not letters and [r["id"] for _, r in rows] == ids and [r["text"] for _, r in rows] == ["one", "two"]
        assert [p for p, _ in rows] == ([1, 2] if name.endswith(".jsonl") else [2, 3])


def test_a_split_jsonl_file_with_a_byte_order_mark_holds_every_line_once(tmp_path):
    lines = [json.dumps({"id": i, "text": "x" * (i % 5)}) for i in range(40)]
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    units = io.plan_units([str(tmp_path / "a.jsonl")], unit_size=50)
    assert len(units) > 10
    rows = [pr for u in units for pr in _read_unit(u)[0]]
    assert [(p, r["id"]) for p, r in sorted(rows, key=lambda pr: pr[0])] == [(i + 1, i) for i in range(40)]


def test_csv_fields_over_128_kib_are_read(tmp_path):
    big = "é" * (300 << 10)
    (tmp_path / "a.csv").write_text(f'id,text\n1,"{big}"\n2,small\n', encoding="utf-8")
    (unit,) = io.plan_units([str(tmp_path / "a.csv")])
    rows, letters, _ = _read_unit(unit)
    assert not letters and [len(r["text"]) for _, r in rows] == [300 << 10, 5]


def test_a_changed_file_changes_its_fingerprint(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1, "text": "x"}\n')
    (before,) = io.plan_units([str(path)])
    with open(path, "a") as f:
        f.write('{"id": 2, "text": "y"}\n')
    (after,) = io.plan_units([str(path)])
    assert before.key == after.key and before.fingerprint != after.fingerprint


def test_public_import_paths_stay_the_same():
    import bulkinfer
    from bulkinfer.beam import io as beam_io
    from bulkinfer.io import ReadDataset, WriteDataset

    assert ReadDataset is bulkinfer.io.ReadDataset is beam_io.ReadDataset
    assert WriteDataset is bulkinfer.io.WriteDataset is beam_io.WriteDataset


@pytest.mark.parametrize("after_failure", ["start_bundle", "teardown"])
def test_a_failed_bundles_partial_file_is_removed(tmp_path, monkeypatch, after_failure):
    """A bundle that fails after its writer opened a file leaves nothing behind: the next start_bundle (Beam
    reuses the DoFn) or teardown (Beam discards it) closes the file and deletes its temporary name, and
    the rows it held are not written (the runner retries them)."""
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 64)  # the first batch opens a file
    for out, dofn in ((tmp_path / "a", io._WriteShards(directory=str(tmp_path / "a"), fmt="parquet", columns=None,
                                                       prefix="part", rows_per_file=1000)),
                      (tmp_path / "b", commit._WriteUnitParts(str(tmp_path / "b"), "parquet", None, 1000))):
        dofn.setup()
        dofn.start_bundle()
        batch = Batch(pa.table({"id": list(range(50)), "x": np.arange(50, dtype=np.float32)}), unit="u0")
        assert list(dofn.process(batch)) == []  # a row group written, the file still open
        temps = list(out.glob(".tmp-*"))
        assert len(temps) == 1
        getattr(dofn, after_failure)()  # the bundle failed: no finish_bundle
        assert list(out.glob(".tmp-*")) == []
        assert [p for p in out.glob("*.parquet")] == []
        if after_failure == "start_bundle":  # the reused DoFn writes its next bundle normally
            list(dofn.process(batch))
            assert sum(1 for _ in dofn.finish_bundle()) == 1
