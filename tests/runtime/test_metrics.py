"""Engine metrics reach Beam Metrics and report.json: load time, device-busy fraction, back-offs."""

import dataclasses
import json

import bulkinfer
from bulkinfer.runtime import Bucketing
from bulkinfer.tasks import run as job
from bulkinfer.testing import synthetic_texts


def test_report_has_load_time_busy_fraction_and_backoffs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(synthetic_texts(40))))
    # A name of its own, so this process has not loaded this spec before (loads are shared per process).
    model = bulkinfer.TextEmbedder.from_name(
        "minilm", max_length=16, bucketing=Bucketing(lengths=(16,), token_budget=128, ladder=1))
    model = dataclasses.replace(model, name="minilm-metrics-test")
    report = job.run(model, job.JobSpec(input=str(src), output=str(tmp_path / "out")))
    assert report["rows_out"] == 40 and report["reconciled"]
    assert report["model_load_s"] > 0  # recorded from a bundle, not from setup
    assert 0 < report["device_busy_fraction"] <= 1
    assert report["oom_backoffs"] == 0
    assert report["compiles"] + report["executables_loaded"] >= 1 and report["batches"] >= 1
    assert 0 < report["padding_efficiency"] <= 1
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["device_busy_fraction"] == report["device_busy_fraction"]
