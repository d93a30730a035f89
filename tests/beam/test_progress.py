import io

from bulkinfer.beam import progress


def test_progress_line_shows_rate_and_eta_when_total_is_known():
    with progress.Progress(total=1000, stream=io.StringIO()) as p:
        progress.advance(250)
        line = p.line()
    assert line.startswith("250/1,000 rows (25%)") and "rows/s" in line and "ETA" in line


def test_progress_line_without_total_has_no_eta():
    with progress.Progress(total=None, stream=io.StringIO()) as p:
        progress.advance(7)
        line = p.line()
    assert line.startswith("7 rows") and "ETA" not in line


def test_rows_computed_in_a_flush_move_the_line_before_they_leave_and_never_past_the_total():
    with progress.Progress(total=1000, stream=io.StringIO()) as p:
        progress.advance(100)  # dead letters of a flush leave at once
        progress.computed(60)
        assert p.line().startswith("100/1,000 rows (10%)")
        progress.computed(240)  # batches of the flush complete; its rows have not left yet
        assert p.line().startswith("300/1,000 rows (30%)")
        progress.computed(900)  # a failed batch's rows computed again while isolating the bad row
        assert p.line().startswith("1,000/1,000 rows (100%)")
        progress.advance(1100)  # the estimate was short: what left is what the line says
        assert p.line().startswith("1,200/1,000 rows")


def test_bulk_inference_reports_each_completed_engine_batch_to_the_progress_line():
    import apache_beam as beam
    import numpy as np
    from apache_beam.options.pipeline_options import PipelineOptions

    from bulkinfer.beam.batch import Batch
    from bulkinfer.beam.transform import BulkInference
    from bulkinfer.models.jax_model import JaxModel
    from bulkinfer.runtime.engine import Engine

    seen = []
    run = Engine.run

    def recording_run(self, inputs, stats=None):  # the counts the line received while the call ran
        out = run(self, inputs, stats)
        seen.append((progress._computed, progress._done))
        return out

    def double(params, batch):
        return {"y": batch["x"] * params}

    model = JaxModel(double, params=np.float32(2.0), inputs={"x": ((3,), "float32")}, batch_size=8, ladder=0)
    rows = [{"id": i, "x": np.full(3, i, np.float32)} for i in range(50)]
    Engine.run = recording_run
    try:
        with progress.Progress(total=None, stream=io.StringIO()):
            with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions()) as p:
                _ = p | beam.Create([Batch(rows)]) | BulkInference(model, id_field="id")
    finally:
        Engine.run = run
    assert seen == [(50, 0)]  # all 50 rows computed (7 batches of 8) before any left the flush


def test_the_rate_and_eta_count_from_the_first_rows_not_from_the_load():
    now = [0.0]
    with progress.Progress(total=1000, stream=io.StringIO(), clock=lambda: now[0]) as p:
        now[0] = 10.0  # ten seconds of model load and compiles, then the first batch completes
        progress.computed(100)
        assert p.line() == "100/1,000 rows (10%)  10 rows/s  ETA 1:30"  # nothing to go on yet but the mean
        now[0] = 12.0
        progress.computed(100)
        assert p.line() == "200/1,000 rows (20%)  50 rows/s  ETA 0:16"  # 100 rows in the 2 s since the first
