"""Hostile values on the output side: a lone surrogate (valid JSON: "ok\\ud800bad") is a dead letter or is
written escaped, never a crash: in Beam's coders, in JSONL and Parquet, and inside dead letters."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.coders import coders
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that

from bulkinfer import BulkInference
from bulkinfer.beam.batch import Batch, dead_letter, escape_surrogates
from bulkinfer.beam.inputs import model_inputs
from bulkinfer.beam.io import ReadDataset, WriteDataset
from bulkinfer.beam.writers import rows_to_table, write_temp
from bulkinfer.models.signature import TEXT, TensorSpec
from bulkinfer.testing import CountingModel

BAD_TEXT = "ok\ud800bad"  # what json.loads('"ok\\ud800bad"') gives
SURROGATE_ERROR = "field 'text' holds a lone surrogate U+D800 at character 2, which is not valid Unicode"


def test_escape_surrogates_touches_only_strings_that_hold_one():
    clean = {"id": 1, "text": "héllo", "v": np.ones(2)}
    assert escape_surrogates(clean)["v"] is clean["v"]
    assert escape_surrogates("héllo") == "héllo"
    assert escape_surrogates({"a\udc80": [BAD_TEXT, ("x", 2)]}) == {"a\\udc80": ["ok\\ud800bad", ("x", 2)]}


def test_model_inputs_makes_a_surrogate_text_a_dead_letter_naming_field_code_point_and_character():
    batch = Batch([{"id": "a", "text": "fine"}, {"id": "s1", "text": BAD_TEXT}, {"id": "b", "text": "héllo"},
                   {"id": "c", "text": "\udfff"}])
    valid, inputs, bad = model_inputs(batch, (TensorSpec("text", (), TEXT),), {"text": "text"})
    assert valid == [0, 2] and inputs == {"text": ["fine", "héllo"]}
    assert [i for i, _ in bad] == [1, 3]
    assert SURROGATE_ERROR in bad[0][1]
    assert "U+DFFF at character 0" in bad[1][1]


def test_a_dead_letter_with_a_surrogate_passes_beams_coder_and_the_jsonl_writer(tmp_path):
    record = {"id": "s\ud801", "text": BAD_TEXT}
    coder = coders.FastPrimitivesCoder()
    with pytest.raises(UnicodeEncodeError):  # what crashed whole jobs: the raw record in Beam's coder
        coder.encode(record)
    letter = dead_letter(stage="inference", error="line 2: bad", record=record, row_id=record["id"])
    assert coder.decode(coder.encode(letter)) == letter
    assert letter["record"] == {"id": "s\\ud801", "text": "ok\\ud800bad"} and letter["id"] == "s\\ud801"
    final = str(tmp_path / "failed.jsonl")
    with open(write_temp(final, [letter], "jsonl"), encoding="utf-8") as f:
        assert json.loads(f.read()) == letter


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_rows_with_surrogates_anywhere_are_written_in_both_formats(tmp_path, fmt):
    rows = [
        {"id": "s\ud800", "text": "fine", "tags": ["a", "b\udc00"], "n": 1, "mixed": 1},
        {"id": "t", "text": BAD_TEXT, "tags": [], "n": 2, "mixed": "x\udbff"},
        {"id": "u", "text": "é", "tags": None, "n": 3, "mixed": None, "k\udfff": "v"},
    ]
    final = str(tmp_path / f"part.{fmt}")
    temp = write_temp(final, rows, fmt)
    if fmt == "jsonl":
        with open(temp, encoding="utf-8") as f:  # strict UTF-8 decoding
            assert [json.loads(line) for line in f] == rows  # JSON escapes: the very same strings
        return
    got = pq.read_table(temp)
    assert got.schema.field("tags").type == pa.list_(pa.string())  # types kept, only the text escaped
    assert got.schema.field("n").type == pa.int64()
    assert got.column("id").to_pylist() == ["s\\ud800", "t", "u"]
    assert got.column("text").to_pylist() == ["fine", "ok\\ud800bad", "é"]
    assert got.column("tags").to_pylist() == [["a", "b\\udc00"], [], None]
    assert got.column("mixed").to_pylist() == ["1", "x\\udbff", None]  # mixed types: text
    assert got.column("k\\udfff").to_pylist() == [None, None, "v"]


def test_rows_to_table_without_surrogates_is_unchanged():
    rows = [{"id": 1, "text": "é", "v": np.arange(2, dtype=np.float32)}, {"id": 2, "text": None,
                                                                        "v": np.ones(2, np.float32)}]
    table = rows_to_table(rows)
    assert table.column("text").to_pylist() == ["é", None] and table.schema.field("v").type.list_size == 2


def test_pipeline_with_surrogate_rows_dead_letters_one_and_writes_the_rest(tmp_path):
    """Through the real runner (its coders encode every element): one dead letter, no crash."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "hello"}\n{"id": "s1", "text": "ok\\ud800bad"}\n'
                   '{"id": "x\\udc00", "text": "fine", "extra": "\\ud83d"}\n', encoding="utf-8")
    out = tmp_path / "out"

    def one_surrogate_letter(letters):
        assert len(letters) == 1, letters
        assert letters[0]["id"] == "s1" and SURROGATE_ERROR in letters[0]["error"]
        assert letters[0]["record"] == {"id": "s1", "text": "ok\\ud800bad"}

    with test_pipeline.TestPipeline() as p:
        rows = p | ReadDataset(str(src))
        preds, failed = rows | BulkInference(CountingModel()).with_exception_handling()
        _ = preds | "Parquet" >> WriteDataset(str(out / "pq"))
        _ = preds | "Jsonl" >> WriteDataset(str(out / "js"), format="jsonl")
        _ = failed | "Failed" >> WriteDataset(str(out / "failed"), format="jsonl")
        assert_that(failed, one_surrogate_letter)
    table = pq.ParquetDataset([str(f) for f in (out / "pq").glob("*.parquet")]).read().sort_by("id")
    assert table.column("id").to_pylist() == ["a", "x\\udc00"] and table.column("length").to_pylist() == [5, 4]
    assert table.column("extra").to_pylist() == [None, "\\ud83d"]
    js = [json.loads(line) for f in (out / "js").glob("*.jsonl") for line in f.read_text("utf-8").splitlines()]
    assert sorted(r["id"] for r in js) == ["a", "x\udc00"]  # JSON escapes read back as the same strings
    letters = [json.loads(line) for f in (out / "failed").glob("*.jsonl")
               for line in f.read_text("utf-8").splitlines()]
    assert [(f["id"], f["record"]["text"]) for f in letters] == [("s1", "ok\\ud800bad")]
