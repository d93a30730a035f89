"""`bulkinfer plan`: exact row counts, a deterministic spread sample, the deadline and cost arithmetic, bad
flags, and (slow) a plan whose predicted_seconds a real run then meets within the stated tolerance."""

import csv
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bulkinfer.beam import commit
from bulkinfer.cli import main
from bulkinfer.tasks import plan as planner
from bulkinfer.tasks import run as job
from bulkinfer.tasks.plan import sampling
from bulkinfer.testing import CountingModel, synthetic_texts


def _messy_inputs(root):
    """Files of every format with the records that make naive counting wrong; returns them."""
    root.mkdir()
    (root / "a.jsonl").write_bytes(
        b'\xef\xbb\xbf{"id": 1, "text": "a"}\n\n   \r\n{"id": 2}\n{"id": 3, "text": \n\xff\xfe not utf-8\n'
        b'\xc2\xa0\n\x1c\n[1, 2]\n{"id": 4, "text": "last line without a newline"}')
    (root / "plain.csv").write_text("id,text\n1,a\n\n2,b\n3, \n4,c,extra\n5,no newline at the end")
    with open(root / "quoted.csv", "w", newline="") as f:
        f.write('id,text\r\n1,"a field\nover two lines"\r\n\r\n2,"said ""hi"""\r\n3,b\r\n')
    (root / "header-only.csv").write_text("id,text\n")
    (root / "bad-header.csv").write_bytes(b"i\xffd,text\n1,a\n\n2,b\n")  # each record a dead letter; not the empty line
    table = pa.table({"id": list(range(2500)), "text": [f"row {i}" for i in range(2500)]})
    pq.write_table(table, root / "groups.parquet", row_group_size=1000)
    return sorted(p for p in root.iterdir())


def test_row_counts_are_exactly_what_a_run_reads_per_file(tmp_path):
    files = _messy_inputs(tmp_path / "in")
    out = tmp_path / "out"
    job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "in" / "*"), output=str(out)))
    read = {}
    for record in commit.committed(str(out)).values():
        read[record["source"]] = read.get(record["source"], 0) + record["rows_in"]
    counted = {str(f): planner.count_rows(str(f)) for f in files}
    assert counted == {str(f): read.get(str(f), 0) for f in files}
    # And the numbers themselves, by construction of the files above:
    assert [counted[str(tmp_path / "in" / name)] for name in
            ("a.jsonl", "plain.csv", "quoted.csv", "header-only.csv", "bad-header.csv", "groups.parquet")
            ] == [6, 5, 3, 0, 2, 2500]


def test_the_sample_is_deterministic_spread_and_proportional(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "small.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(300))
    pq.write_table(pa.table({"id": list(range(1000, 1900)), "text": ["x"] * 900}), src / "big.parquet")
    files = [str(src / "big.parquet"), str(src / "small.jsonl")]
    counts = [planner.count_rows(f) for f in files]
    assert planner.allocate(counts, 100) == [75, 25]
    assert planner.allocate([3, 3, 3], 100) == [3, 3, 3]
    assert sum(planner.allocate([7, 11, 13], 10)) == 10

    def draw(name):
        (tmp_path / name).mkdir()
        written = planner.sample_rows(files, counts, 100, str(tmp_path / name))
        ids = []
        for path in written:
            if path.endswith(".parquet"):
                ids += pq.read_table(path).column("id").to_pylist()
            else:
                ids += [json.loads(line)["id"] for line in open(path)]
        return ids

    ids = draw("one")
    assert ids == draw("two")  # deterministic
    jsonl_ids = [i for i in ids if i < 1000]
    parquet_ids = [i for i in ids if i >= 1000]
    assert (len(parquet_ids), len(jsonl_ids)) == (75, 25) and len(set(ids)) == 100
    # Spread over each file, not its head: evenly spaced from start to end.
    assert jsonl_ids[0] < 12 and jsonl_ids[-1] > 288 and np.all(np.diff(jsonl_ids) == 12)
    assert parquet_ids[0] < 1012 and parquet_ids[-1] > 1888


def test_a_large_file_is_sampled_in_runs_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "WHOLE_FILE_BYTES", 1000)  # every file is "large"
    monkeypatch.setattr(sampling, "RUN_ROWS", 5)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "text": "w " * (i % 7)}) + "\n" for i in range(2000))
    pq.write_table(pa.table({"id": list(range(2000))}), tmp_path / "big.parquet", row_group_size=300)
    lines = sampling._sample_jsonl(str(path), 2000, 40)
    ids = [json.loads(line)["id"] for line in lines]
    table = sampling._sample_parquet(str(tmp_path / "big.parquet"), 2000, 40)
    for got in (ids, table.column("id").to_pylist()):
        assert len(got) == 40 and len(set(got)) == 40
        runs = [got[i:i + 5] for i in range(0, 40, 5)]
        assert all(np.all(np.diff(r) == 1) for r in runs)  # consecutive rows within a run
        assert runs[0][0] <= 1 and runs[-1][0] > 1700  # runs spread to the end


def _costs(**changes):
    values = dict(per_row_s=0.002, per_unit_s=0.05, per_wave_s=0.5, per_run_s=1.0, load_compile_s=4.0,
                  first_compile_s=20.0, sample_rows=2000, sample_units=1, sample_failed=0, compiles=12,
                  device="cpu: 1 x cpu")
    values.update(changes)
    return planner.Costs(**values)


def test_deadline_and_cost_arithmetic():
    costs = _costs()
    # 1,000,000 rows in 100 units, 2 waves: 1 + 4 + 2 * 0.5 + 100 * 0.05 + 1e6 * 0.002 = 2011 s.
    answer = planner.estimate(costs, rows=1_000_000, units=100, waves=2, spec=planner.PlanSpec())
    assert answer["predicted_seconds"] == 2011.0 and answer["tolerance"] == 0.3
    assert answer["predicted_range_seconds"] == [1407.7, 2614.3]
    assert answer["accelerators_needed"] == 1 and answer["cost"] is None
    assert answer["accelerator_hours"] == round(2011 / 3600, 4)
    # A 10-minute deadline: per accelerator 5 s fixed (run + load), 2006 s divisible -> ceil(2006 / 595) = 4.
    spec = planner.PlanSpec(deadline_s=600, price_per_hour=3.0)
    answer = planner.estimate(costs, rows=1_000_000, units=100, waves=2, spec=spec)
    assert answer["accelerators_needed"] == 4
    assert answer["wall_seconds_with_accelerators"] == round(5 + 2006 / 4, 1) <= 600
    hours = (4 * 5 + 2006) / 3600
    assert answer["accelerator_hours"] == round(hours, 4) and answer["cost"] == round(round(hours, 4) * 3.0, 2)
    assert answer["predicted_seconds"] == 2011.0  # still this machine running all of it
    # A deadline no number of accelerators meets.
    answer = planner.estimate(costs, rows=10, units=1, waves=1, spec=planner.PlanSpec(deadline_s=4))
    assert answer["accelerators_needed"] is None and "not longer than" in answer["deadline_problem"]
    # More accelerators than units of work split nothing further: capped at the units, with the reason.
    answer = planner.estimate(costs, rows=1_000_000, units=3, waves=1, spec=planner.PlanSpec(deadline_s=60))
    assert answer["accelerators_needed"] == 3 and "--unit-size" in answer["deadline_problem"]
    assert answer["wall_seconds_with_accelerators"] > 60
    # --rows-per-s measured on the target: its rate for hours and accelerators, not for predicted_seconds.
    spec = planner.PlanSpec(accelerator="nvidia-h200", rows_per_s=20_000, deadline_s=60)
    answer = planner.estimate(costs, rows=1_000_000, units=100, waves=2, spec=spec)
    assert answer["predicted_seconds"] == 2011.0
    assert answer["accelerators_needed"] == int(np.ceil((50 + 5 + 1) / (60 - 5)))


def test_another_accelerator_without_its_speed_is_said_plainly():
    spec = planner.PlanSpec(accelerator="nvidia-h200")
    said = " ".join(planner.assumptions(_costs(), rows=10, files=1, spec=spec, job=job.JobSpec(input="x", output="")))
    assert "not nvidia-h200's; no speed-up is assumed" in said and "--rows-per-s" in said
    spec = planner.PlanSpec(accelerator="nvidia-h200", rows_per_s=5000)
    said = " ".join(planner.assumptions(_costs(), rows=10, files=1, spec=spec, job=job.JobSpec(input="x", output="")))
    assert "5000 rows/s on nvidia-h200 (--rows-per-s, given, not measured here)" in said


def test_the_local_device_named_as_the_accelerator_is_measured_there():
    assert planner.same_device("nvidia-h200", "gpu: 8 x NVIDIA H200")
    assert planner.same_device("type:nvidia-h200;count:1", "gpu: 1 x NVIDIA H200")
    assert not planner.same_device("nvidia-h100", "gpu: 1 x NVIDIA H200")
    assert not planner.same_device("tpu-v5e", "cpu: 1 x cpu")
    spec = planner.PlanSpec(accelerator="cpu")
    said = " ".join(planner.assumptions(_costs(), rows=10, files=1, spec=spec, job=job.JobSpec(input="x", output="")))
    assert "every figure was measured on it" in said and "no speed-up" not in said


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45),
                                           ("1.5d", 129600), ("3600", 3600), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert planner.parse_duration(text) == seconds


@pytest.mark.parametrize("flags, message", [
    (["--deadline", "2x"], "argument --deadline: '2x' is not a duration; write e.g. 45m, 2h"),
    (["--deadline", "0h"], "argument --deadline: '0h': the deadline must be longer than 0 seconds"),
    (["--deadline", "h2"], "'h2' is not a duration"),
    (["--price-per-hour", "-1"], "argument --price-per-hour: '-1' must be >= 0"),
    (["--sample", "0"], "argument --sample: '0' must be > 0"),
    (["--rows-per-s", "fast"], "argument --rows-per-s: 'fast' is not a number"),
])
def test_bad_flags_exit_2_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "digits", "--input", "x.jsonl", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_flags_and_missing_input_exit_2(tmp_path, capsys):
    assert main(["plan", "--model", "digits", "--input", "a.jsonl", "b.jsonl"]) == 2
    assert "unrecognized arguments: b.jsonl; quote the --input glob" in capsys.readouterr().err
    assert main(["plan", "--model", "digits", "--input", "a.jsonl", "--runner", "DataflowRunner"]) == 2
    assert "Beam options do not apply" in capsys.readouterr().err
    assert main(["plan", "--model", "digits", "--input", str(tmp_path / "*.jsonl")]) == 2
    assert "no input file matches" in capsys.readouterr().err


def test_plan_json_from_the_cli_measures_a_real_model(tmp_path, capsys):
    """digits (a built-in JAX classifier: small shapes, quick compiles) through the whole plan."""
    rng = np.random.default_rng(0)
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "pixels": rng.integers(0, 17, (8, 8)).tolist()}) + "\n"
                     for i in range(700))
        f.write('{"id": "bad", "pixels": "not an image"}\n')
    with open(tmp_path / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "note"], *[[i, "no pixels here"] for i in range(50)]])
    from bulkinfer.beam import loading

    for loaded in [m for m in loading._loaded if getattr(m, "name", None) == "digits"]:  # other tests' (a cache)
        loading.release(loaded)
    code = main(["plan", "--model", "digits", "--input", str(tmp_path / "*"), "--sample", "200",
                 "--deadline", "1h", "--price-per-hour", "2.5", "--accelerator", "tpu-v5e", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["files"], report["units"], report["waves"]) == (751, 2, 2, 1)
    assert report["sample_rows"] == 200 and report["measured"]["sample_units"] == 2
    # The CSV's share, 13 of 200, all bad; the one bad JSONL line, its file's last, falls between the picks.
    assert report["measured"]["sample_failed"] == 13
    assert report["predicted_seconds"] > 0 and report["tolerance"] <= 0.3
    assert report["accelerators_needed"] == 1 and report["cost"] == round(report["accelerator_hours"] * 2.5, 2)
    assert any("not tpu-v5e's" in a for a in report["assumptions"])
    # The plan keeps no digits model loaded: the job that follows starts fresh, as it measured.
    assert not [m for m in loading._loaded if getattr(m, "name", None) == "digits"]


@pytest.mark.slow
def test_a_planned_job_runs_within_the_stated_tolerance(tmp_path, minilm_spec):
    """Plan a MiniLM job, then run it in this process: the wall time is within the tolerance."""
    src = tmp_path / "in"
    src.mkdir()
    texts = synthetic_texts(6000, seed=3)
    with open(src / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts[:3500]))
        f.write("not json\n")
    pq.write_table(pa.table({"id": list(range(3500, 6000)), "text": texts[3500:]}), src / "b.parquet",
                   row_group_size=1000)
    spec = job.JobSpec(input=str(src / "*"), output=str(tmp_path / "out"))
    report = planner.plan(minilm_spec, spec, planner.PlanSpec(sample=2000))
    assert report["rows"] == 6001 and report["sample_rows"] == 2000
    t0 = time.perf_counter()
    done = job.run(minilm_spec, spec)
    actual = time.perf_counter() - t0
    assert done["rows_in"] == report["rows"] and done["reconciled"]
    predicted, tolerance = report["predicted_seconds"], report["tolerance"]
    assert tolerance <= 0.3
    assert abs(actual - predicted) <= tolerance * predicted, (actual, report["measured"])
