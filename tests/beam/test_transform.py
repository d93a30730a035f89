import threading

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

import bulkinfer
from bulkinfer.testing import CountingModel


def _pipeline(**options):
    return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(flags=[], **options))


class _Threads(beam.DoFn):
    """Records which threads process elements (a user's row-level DoFn)."""

    seen: set = set()

    def process(self, row):
        _Threads.seen.add(threading.get_ident())
        yield row


def test_model_loaded_once_per_process_shared_by_threads():
    model = CountingModel(name="shared-test")
    before = CountingModel.loads
    _Threads.seen = set()
    rows = [{"id": i, "text": "x" * (i % 7)} for i in range(4000)]
    with _pipeline(direct_num_workers=4, direct_running_mode="multi_threading") as p:
        out = (p | beam.Create(rows, reshuffle=True) | beam.ParDo(_Threads())
               | bulkinfer.BulkInference(model) | beam.Map(lambda r: (r["id"], int(r["length"]))))
        assert_that(out, equal_to([(i, i % 7) for i in range(4000)]))
    assert len(_Threads.seen) > 1, "the test needs several worker threads to mean anything"
    assert CountingModel.loads - before == 1


def test_resource_hints_are_attached_to_the_inference_stage():
    p = beam.Pipeline()
    _ = (p | beam.Create([{"text": "a"}])
         | "Embed" >> bulkinfer.BulkInference(CountingModel(), accelerator="type:nvidia-h200;count:1",
                                              min_ram="16GB"))
    proto = p.to_runner_api()
    infer = [t for t in proto.components.transforms.values() if t.unique_name == "Embed/Infer"]
    assert len(infer) == 1
    hints = proto.components.environments[infer[0].environment_id].resource_hints
    assert hints["beam:resources:accelerator:v1"] == b"type:nvidia-h200;count:1"
    assert hints["beam:resources:min_ram_bytes:v1"] == str(16 * 10**9).encode()
    create = [t for t in proto.components.transforms.values() if t.unique_name.startswith("Create")]
    assert all("beam:resources:accelerator:v1" not in proto.components.environments[t.environment_id].resource_hints
               for t in create if t.environment_id)


def test_seed_pipeline_with_two_inference_stages_and_row_dofns(minilm_spec, minilm):
    texts = ["bulk inference on beam", "", "café 東京"]

    class Preprocess(beam.DoFn):
        def process(self, row):
            yield {"id": row["id"], "text": row["text"].strip()}

    class Postprocess(beam.DoFn):
        def process(self, row):
            yield (row["id"], float(np.linalg.norm(row["embedding"])), int(row["length"]))

    with _pipeline() as p:
        out = (p | beam.Create([{"id": i, "text": t} for i, t in enumerate(texts)])
               | "Preprocess" >> beam.ParDo(Preprocess())
               | "Embed" >> bulkinfer.BulkInference("minilm", accelerator="type:nvidia-h200;count:1", min_ram="16GB")
               | "Length" >> bulkinfer.BulkInference(CountingModel())
               | "Postprocess" >> beam.ParDo(Postprocess()))
        assert_that(out, equal_to([(i, pytest.approx(1.0, abs=1e-5), len(t)) for i, t in enumerate(texts)]))


def test_batches_in_batches_out_with_predictions_equal_to_direct_predict(minilm_spec, minilm):
    texts = [f"sentence number {i} " * (i % 9) for i in range(50)]
    expected = minilm.embed(texts)
    batches = [bulkinfer.Batch([{"id": i, "text": texts[i]} for i in range(s, s + 10)]) for s in range(0, 50, 10)]

    def matches(elements):
        assert all(isinstance(b, bulkinfer.Batch) for b in elements)
        got = {r["id"]: r["embedding"] for b in elements for r in b.rows}
        assert sorted(got) == list(range(50))
        np.testing.assert_allclose(np.stack([got[i] for i in range(50)]), expected, atol=1e-5)

    with _pipeline() as p:
        assert_that(p | beam.Create(batches) | bulkinfer.BulkInference(minilm_spec), matches)


def test_bad_rows_go_to_dead_letters_with_row_and_field():
    rows = [{"id": 1, "text": "ok"}, {"id": 2}, {"id": 3, "text": None}, {"id": 4, "text": ["a"]},
            {"id": 5, "text": "boom here"}, {"id": 6, "text": "fine"}]
    with _pipeline() as p:
        good, bad = (p | beam.Create(rows)
                     | bulkinfer.BulkInference(CountingModel(fail_on="boom")).with_exception_handling())
        assert_that(good | "ids" >> beam.Map(lambda r: r["id"]), equal_to([1, 6]), label="good")
        assert_that(bad | beam.Map(lambda d: (d["id"], d["stage"], d["error"])), equal_to([
            (2, "inference", "row 2 (id 2): field 'text' is missing"),
            (3, "inference", "row 3 (id 3): field 'text' is null, expected a string"),
            (4, "inference", "row 4 (id 4): field 'text' is list, expected a string"),
            (5, "inference", "row 5 (id 5): model failed: RuntimeError: injected failure on a text containing 'boom'"),
        ]), label="bad")


_TABLE_CASES = {
    # rows -> (good (id, text, length), dead letters (id, error, record))
    "nulls and a model failure": (
        [{"id": 1, "text": "ok"}, {"id": 2, "text": None}, {"id": 3, "text": "boom here"}, {"id": 4, "text": "fine"}],
        [(1, "ok", 2), (4, "fine", 4)],
        [(2, "row 2 (id 2): field 'text' is null, expected a string", {"id": 2, "text": None}),
         (3, "row 3 (id 3): model failed: RuntimeError: injected failure on a text containing 'boom'",
          {"id": 3, "text": "boom here"})]),
    "an int text column": (
        [{"id": 1, "text": 5}, {"id": 2, "text": None}],
        [],
        [(1, "row 1 (id 1): field 'text' is int, expected a string", {"id": 1, "text": 5}),
         (2, "row 2 (id 2): field 'text' is null, expected a string", {"id": 2, "text": None})]),
    "no text column": (
        [{"id": 1, "body": "x"}],
        [],
        [(1, "row 1 (id 1): field 'text' is missing", {"id": 1, "body": "x"})]),
    "an earlier length column is replaced": (
        [{"id": 1, "text": "abc", "length": -1}],
        [(1, "abc", 3)],
        []),
}


@pytest.mark.parametrize("case", sorted(_TABLE_CASES))
@pytest.mark.parametrize("form", ["table", "dicts"])
def test_table_batches_give_the_same_predictions_and_dead_letters_as_dict_rows(case, form):
    rows, good, bad = _TABLE_CASES[case]
    batch = bulkinfer.Batch(pa.Table.from_pylist(rows) if form == "table" else rows)

    def kind(batches):  # a table batch stays a table, with the prediction as an int64 column
        assert all((b.table is not None) == (form == "table") for b in batches)
        if form == "table":
            assert all(b.table.schema.field("length").type == pa.int64() for b in batches)

    with _pipeline() as p:
        out, failed = (p | beam.Create([batch])
                       | bulkinfer.BulkInference(CountingModel(fail_on="boom")).with_exception_handling())
        assert_that(out, kind, label="kind")
        assert_that(out | beam.FlatMap(lambda b: [(r["id"], r["text"], int(r["length"])) for r in b.rows]),
                    equal_to(good), label="good")
        assert_that(failed | beam.Map(lambda d: (d["id"], d["error"], d["record"])), equal_to(bad), label="bad")


def test_table_batches_of_vectors_get_a_fixed_size_list_column(minilm_spec, minilm):
    texts = [f"sentence number {i} " * (i % 5) for i in range(12)]
    expected = minilm.embed(texts)

    def matches(batches):
        table = pa.concat_tables(b.table for b in batches).sort_by("id")
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), expected.shape[1])
        got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(expected.shape)
        np.testing.assert_allclose(got, expected, atol=1e-5)

    batches = [bulkinfer.Batch(pa.table({"id": list(range(s, s + 4)), "text": texts[s:s + 4]})) for s in (0, 4, 8)]
    with _pipeline() as p:
        assert_that(p | beam.Create(batches) | bulkinfer.BulkInference(minilm_spec), matches)


def test_without_exception_handling_a_bad_row_fails_the_job_with_its_reason():
    with pytest.raises(Exception, match="field 'text' is missing.*with_exception_handling"):
        with _pipeline() as p:
            _ = p | beam.Create([{"id": 1, "text": "ok"}, {"id": 2}]) | bulkinfer.BulkInference(CountingModel())


def test_flush_rows_is_checked_on_construction():
    with pytest.raises(ValueError, match="flush_rows"):
        bulkinfer.BulkInference(CountingModel(), flush_rows=0)


def test_guarded_user_dofn_turns_row_failures_into_dead_letters():
    def parse(row):
        yield {"id": row["id"], "text": row["raw"].strip()}

    rows = [{"id": 1, "raw": " a "}, {"id": 2, "raw": None}, {"id": 3, "raw": "c"}]
    with _pipeline() as p:
        good, bad = p | beam.Create(rows) | bulkinfer.Guarded(parse, stage="preprocess")
        assert_that(good, equal_to([{"id": 1, "text": "a"}, {"id": 3, "text": "c"}]), label="good")
        assert_that(bad | beam.Map(lambda d: (d["id"], d["stage"], d["error"], d["record"])),
                    equal_to([(2, "preprocess", "id 2: AttributeError(\"'NoneType' object has no attribute 'strip'\")",
                               {"id": 2, "raw": None})]), label="bad")


def test_guarded_rejects_unknown_stage():
    with pytest.raises(ValueError, match="stage must be one of"):
        bulkinfer.Guarded(lambda r: [r], stage="inference")


def test_a_model_value_that_is_no_model_fails_at_construction_with_one_line():
    with pytest.raises(TypeError, match="model 12345 is neither a built-in name .*, a model directory nor a model spec"):
        bulkinfer.BulkInference(12345)
    with pytest.raises(ValueError, match="model 'no-such-model' is neither a built-in name"):
        bulkinfer.BulkInference("no-such-model")


@pytest.mark.parametrize("form", ["rows", "table"])
def test_keep_fields_carries_input_fields_beside_the_predictions(form, caplog):
    rows = [{"id": i, "text": "x" * i, "label": i % 2, "note": f"n{i}"} for i in range(5)]
    element = bulkinfer.Batch(pa.Table.from_pylist(rows)) if form == "table" else None

    def as_tuples(batch_or_row):
        got = batch_or_row.rows if isinstance(batch_or_row, bulkinfer.Batch) else [batch_or_row]
        return [tuple(sorted((k, int(v) if k == "length" else v) for k, v in r.items())) for r in got]

    with _pipeline() as p:
        source = p | beam.Create([element] if element is not None else rows)
        out = source | bulkinfer.BulkInference(CountingModel(), keep_fields=["label", "absent"]) | beam.FlatMap(as_tuples)
        expected = [tuple(sorted({"id": i, "label": i % 2, "absent": None, "length": i}.items())) for i in range(5)]
        assert_that(out, equal_to(expected))
    named = [r.getMessage() for r in caplog.records if r.name == "bulkinfer.beam.transform"]
    assert named == ["keep_fields: 'absent' is in no row of a batch, so its output column is null; a misspelt "
                     "field name?"]  # once, and only the absent field
