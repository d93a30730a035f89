"""`bulkinfer stats` end to end: digits and MiniLM, 1 vs 7 files (Parquet vs JSONL predictions) and 1 vs 2
workers, drift, the report in Chromium, the Statistics transform's dead letters."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from bulkinfer import cli
from bulkinfer.metrics.sketches import id_hash
from bulkinfer.models.resolve import model_spec
from bulkinfer.tasks import stats as job
from bulkinfer.tasks.run import JobSpec, prediction_files
from bulkinfer.testing import CountingModel

ROWS = 350
WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
QUANTILED = ("confidence", "margin", "entropy_bits")


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """stats.json of the same 350 digits rows as 1 file, as 7 files, and as 7 files on 2 worker processes
    (with the first as baseline), and of a shifted copy (noise, less ink) against the first."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-stats")
    d = load_digits()
    rng = np.random.default_rng(0)
    rows = [{"id": i, "pixels": d.images[i].tolist(), "grp": "even" if i % 2 == 0 else "odd",
             "label": int(d.target[i])} for i in range(ROWS)]
    shifted = [{**r, "pixels": np.clip(np.asarray(r["pixels"]) * 0.5 + rng.uniform(0, 8, (8, 8)), 0, 16).tolist()}
               for r in rows]
    _write(root / "one" / "all.jsonl", rows)
    for k in range(7):
        _write(root / "seven" / f"part-{k}.jsonl", rows[k::7])
    _write(root / "shifted" / "all.jsonl", shifted)
    model = model_spec("digits")
    spec = job.StatsSpec(slice_fields=("grp", "label"))  # "label" is also an output of digits

    def stats(name, data, args=(), fmt="parquet", **settings):
        out = root / "out" / name
        return job.stats(model, JobSpec(input=str(root / data / "*.jsonl"), output=str(out), format=fmt),
                         job.StatsSpec(**{**spec.__dict__, **settings}), list(args)), out

    runs = {"one": stats("one", "one")}
    runs["seven"] = stats("seven", "seven", fmt="jsonl", report=False)  # predictions as JSONL lists
    runs["shifted"] = stats("shifted", "shifted", baseline=str(root / "out" / "one"))
    # The statistics pipeline again over the 7 files' predictions, on 2 worker processes (each pickles
    # its partial accumulators to the other), and the drift of those against the 1-file run.
    result, out = runs["seven"]
    files = prediction_files(JobSpec(input=str(root / "seven" / "*.jsonl"), output=str(out / "predictions"),
                                         format="jsonl"))
    assert len(files) == 7
    layout = job.find_layout(files, spec, id_field="id", slice_columns=job.slice_columns(model, spec.slice_fields))
    summarized = job.aggregate(files, layout, spec, WORKERS, out=str(root / "two-workers"))
    assert summarized.pop("rows_failed") == 0
    two = {**result, **summarized}
    two["drift"] = job.drift(two, runs["one"][0])
    runs["seven-2-workers"] = two, out
    return runs


def _predictions(out: Path) -> list[dict]:
    """The prediction rows of a stats run (Parquet or JSONL)."""
    rows = []
    for f in sorted((out / "predictions").glob("part-*")):
        rows += pq.read_table(f).to_pylist() if f.suffix == ".parquet" else [
            json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    return rows


def _without_quantiles(group: dict) -> dict:
    group = json.loads(json.dumps(group))
    for name in QUANTILED:
        group.get("classifier", {}).get(name, {}).pop("quantiles", None)
    group.get("embedder", {}).get("norm", {}).pop("quantiles", None)
    return group


def _groups(result: dict) -> dict:
    return dict(job.group_names(result))


def test_digits_stats_are_identical_across_files_and_worker_processes(digits_runs):
    (one, _), (seven, _), (two, _) = (digits_runs[k] for k in ("one", "seven", "seven-2-workers"))
    for result in (one, seven, two):
        assert (result["rows_in"], result["rows_out"], result["rows_failed"]) == (ROWS, ROWS, 0)
    assert one["rows_failed_stats"] == seven["rows_failed_stats"] == 0
    groups = [_groups(r) for r in (one, seven, two)]
    assert list(groups[0])[:3] == ["overall", "grp=even", "grp=odd"]
    assert sorted(list(groups[0])[3:]) == [f"label={k}" for k in range(10)]
    for name in groups[0]:
        assert _without_quantiles(groups[0][name]) == _without_quantiles(groups[1][name]) == \
            _without_quantiles(groups[2][name]), name
    assert sum(groups[0][g]["rows"] for g in ("grp=even", "grp=odd")) == ROWS
    assert one["sketch"]["k"] == 200 and 0.01 < one["sketch"]["normalized_rank_error"] < 0.02


def test_digits_stats_agree_with_numpy_on_the_predictions(digits_runs):
    result, out = digits_runs["seven-2-workers"]
    rows = _predictions(out)
    assert len(rows) == ROWS
    probs = np.array([r["probs"] for r in rows], np.float64)  # [N, 10]
    top2 = -np.sort(-probs, axis=1)[:, :2]
    exact = {"confidence": top2[:, 0], "margin": top2[:, 0] - top2[:, 1],
             "entropy_bits": scipy_entropy(probs, base=2, axis=1)}
    c = result["overall"]["classifier"]
    assert c["class_counts"] == np.bincount(probs.argmax(axis=1), minlength=10).tolist()
    assert c["confidence"]["histogram"]["counts"] == np.histogram(exact["confidence"], np.linspace(0, 1, 21))[0].tolist()
    eps = result["sketch"]["normalized_rank_error"]
    for name, values in exact.items():
        assert c[name]["mean"] == pytest.approx(values.mean(), rel=1e-6, abs=1e-9)
        s = np.sort(values.astype(np.float32))
        for rank, v in c[name]["quantiles"].items():  # the value's rank in the exact data, within the error
            below, upto = (np.searchsorted(s, np.float32(v), side) / s.size for side in ("left", "right"))
            assert below <= float(rank) + eps and upto >= float(rank) - eps, (name, rank, v)
    odd = [r for r in rows if r["grp"] == "odd"]
    odd_counts = np.bincount(np.array([r["probs"] for r in odd]).argmax(axis=1), minlength=10).tolist()
    assert result["slices"]["grp"]["odd"]["classifier"]["class_counts"] == odd_counts
    # The true label, kept as "slice_label" beside the model's own "label" output, slices by the truth.
    threes = [r for r in rows if r["slice_label"] == 3]
    assert result["slices"]["label"]["3"]["rows"] == len(threes) > 0
    assert result["slices"]["label"]["3"]["classifier"]["class_counts"] == np.bincount(
        np.array([r["probs"] for r in threes]).argmax(axis=1), minlength=10).tolist()


def test_drift_is_zero_against_the_same_input_and_larger_against_a_shifted_one(digits_runs):
    same, _ = digits_runs["seven-2-workers"]
    shifted, _ = digits_runs["shifted"]
    one, _ = digits_runs["one"]
    names = ["class_distribution", "confidence_histogram", "margin_histogram", "entropy_histogram"]
    assert list(same["drift"]["overall"]) == list(shifted["drift"]["overall"]) == names
    assert all(v == 0.0 for v in same["drift"]["overall"].values())
    for name in names:
        assert shifted["drift"]["overall"][name] > same["drift"]["overall"][name]
    assert shifted["drift"]["overall"]["confidence_histogram"] > 0.2
    assert set(shifted["drift"]["slices"]["grp"]) == {"even", "odd"} and not shifted["drift"]["skipped"]
    # The distance is scipy's on the same histograms (values outside the edges as two more bins).
    h, b = shifted["overall"]["classifier"]["confidence"]["histogram"], one["overall"]["classifier"]["confidence"]["histogram"]
    expected = jensenshannon(h["counts"] + [h["below"], h["above"]], b["counts"] + [b["below"], b["above"]], base=2)
    assert shifted["drift"]["overall"]["confidence_histogram"] == pytest.approx(expected, abs=1e-12)


def test_the_report_renders_every_figure_in_chromium(digits_runs):
    from bulkinfer.testing import CHROMIUM, render_html

    _, out = digits_runs["shifted"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["class_distribution.png", "confidence_histogram.png", "drift.png"]
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the report's figures were written but not rendered")
    page = render_html(out / "report.html")
    assert page["title"].startswith("Prediction statistics")
    assert len(page["images"]) == len(pngs)
    assert all(img["complete"] and img["naturalWidth"] > 0 for img in page["images"]), page["images"]


@pytest.mark.slow
def test_minilm_embedding_stats_agree_with_numpy(tmp_path):
    texts = ["The cat sat on the mat.", "A dog barked at the mailman.", "Stock markets fell sharply today.",
             "The recipe needs two eggs and flour.", "Rain is expected over the weekend.",
             "She scored the winning goal.", "Quantum computers use qubits.", "He painted the fence white.",
             "Le chat dort sur le canapé.", "Der Zug kommt um acht Uhr an.", "El mercado abre a las nueve.",
             "Il pleut depuis ce matin."]
    rows = [{"id": f"t{i}", "text": t, "lang": "en" if i < 8 else "other"} for i, t in enumerate(texts)]
    _write(tmp_path / "in" / "texts.jsonl", rows)
    out = tmp_path / "out"
    result = job.stats(model_spec("minilm"), JobSpec(input=str(tmp_path / "in" / "*.jsonl"), output=str(out)),
                       job.StatsSpec(slice_fields=("lang",), sample_size=10), [])
    assert (result["rows_in"], result["rows_out"], result["rows_failed"]) == (12, 12, 0)
    e = result["overall"]["embedder"]
    assert "classifier" not in result["overall"] and e["dim"] == 384 and e["rows"] == 12
    predictions = _predictions(out)
    emb = np.array([r["embedding"] for r in predictions], np.float64)  # [12, 384]
    np.testing.assert_allclose(e["mean"], emb.mean(axis=0), rtol=1e-9, atol=2e-10)  # values rounded to 2**-32
    np.testing.assert_allclose(e["variance"], emb.var(axis=0), rtol=1e-6, atol=1e-15)
    norms = np.linalg.norm(emb, axis=1)
    assert e["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-9)
    assert e["norm"]["quantiles"]["0.5"] == pytest.approx(1.0, abs=1e-5)  # MiniLM's vectors are unit length
    # The cosine sample: the 10 rows whose ids hash lowest, all pairs.
    ids = [r["id"] for r in predictions]
    chosen = sorted(range(12), key=lambda i: id_hash(ids[i]))[:10]
    units = emb[chosen] / norms[chosen, None]
    pairs = (units @ units.T)[np.triu_indices(10, 1)]
    assert e["cosine_sample"]["size"] == 10 and e["cosine_sample"]["pairs"] == 45
    assert e["cosine_sample"]["mean_pairwise_cosine"] == pytest.approx(pairs.mean(), abs=1e-9)
    assert result["slices"]["lang"]["en"]["embedder"]["rows"] == 8
    assert sorted(p.name for p in out.glob("*.png")) == ["norm_histogram.png"]


def test_cli_stats_prints_a_summary_and_names_a_missing_output(tmp_path, capsys):
    args = ["stats", "--model", "digits", "--input", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o")]
    _write(tmp_path / "d.jsonl", [{"id": i, "pixels": [[i % 16] * 8] * 8} for i in range(20)])
    assert cli.main(args + ["--sample-size", "50"]) == 0
    printed = capsys.readouterr().out
    assert "rows_in 20  rows_out 20  rows_failed 0" in printed and "confidence median" in printed
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["overall"]["rows"] == 20
    assert cli.main(args + ["--probs-field", "scores"]) == 2
    assert "no field 'scores' (--probs-field)" in capsys.readouterr().err
    assert cli.main(args + ["--baseline", str(tmp_path / "nowhere")]) == 2
    assert "no baseline statistics" in capsys.readouterr().err
    _write(tmp_path / "bad.jsonl", [{"id": 1, "pixel": 0}, {"id": 2}])  # no "pixels": both rows are dead letters
    assert cli.main(["stats", "--model", "digits", "--input", str(tmp_path / "bad.jsonl"), "--output",
                     str(tmp_path / "bad")]) == 1
    assert "all 2 input rows failed" in capsys.readouterr().err


def test_a_model_without_probs_or_embedding_is_a_clear_error(tmp_path):
    _write(tmp_path / "in.jsonl", [{"id": 1, "text": "abc"}])
    with pytest.raises(ValueError, match="neither 'probs'.*'embedding'.*--probs-field or --embedding-field"):
        job.stats(CountingModel(), JobSpec(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="'length' should be a vector"):
        job.stats(CountingModel(), JobSpec(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o")),
                  job.StatsSpec(embedding_field="length"))


def test_statistics_transform_sets_aside_rows_that_do_not_fit(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from bulkinfer.metrics.prediction_stats import PredictionStats

    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(3), 40)
    rows = [{"id": i, "probs": probs[i].tolist(), "src": "a" if i < 25 else "b"} for i in range(40)]
    bad = [{"id": 100, "probs": [0.5, 0.5]}, {"id": 101}, {"id": 102, "probs": "high"}]
    expected = PredictionStats(num_classes=3)
    expected.add(rows=40, probs=probs)
    with beam.Pipeline() as p:
        stats, failed = (p | beam.Create(rows + bad, reshuffle=False)
                         | job.Statistics(num_classes=3, slice_fields=["src"]).with_exception_handling())
        assert_that(stats | beam.Map(lambda s: (s["rows_failed"], s["overall"]["classifier"]["class_counts"],
                                                s["overall"]["rows"], sorted(s["slices"]["src"]),
                                                s["slices"]["src"]["b"]["rows"])),
                    equal_to([(3, expected.to_json()["classifier"]["class_counts"], 40, ["a", "b"], 15)]),
                    label="stats")
        assert_that(failed | beam.Map(lambda d: (d["id"], d["stage"], d["error"].split(": ", 1)[1])), equal_to([
            (100, "stats", "field 'probs' has shape [2], expected [3]"),
            (101, "stats", "field 'probs' is missing or null"),
            (102, "stats", "field 'probs' is str, expected float64[3]")]), label="failed")
    with pytest.raises(ValueError, match="neither|probabilities .num_classes. or embeddings"):
        job.Statistics()
