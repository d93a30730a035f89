"""Evaluation: sklearn's values from Beam combiners, identical across shardings and worker counts,
bootstrap intervals, baseline gating, the digits and MiniLM models end to end, and the report in Chromium."""

import json
import os
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that, equal_to
from sklearn import metrics as skm

from bulkinfer import cli
from bulkinfer.beam.batch import Batch
from bulkinfer.tasks import evaluate as ev
from bulkinfer.testing import CHROMIUM, render_html

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "data" / "digits"
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _rows(n=240, c=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    labels = np.where(rng.random(n) < 0.7, logits.argmax(1), rng.integers(0, c, n))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return [{"id": f"r{i}", "y": int(labels[i]), "probs": probs[i].astype(np.float32), "group": "ab"[i % 2]}
            for i in range(n)]


def test_evaluate_in_a_pipeline_equals_sklearn_and_sets_bad_rows_aside():
    rows = _rows()
    bad = [{"id": "no-label", "probs": rows[0]["probs"]},
           {"id": "too-big", "y": 4, "probs": rows[0]["probs"]},
           {"id": "logits", "y": 1, "probs": np.array([3.0, -1, 0, 0], np.float32)},
           {"id": "short", "y": 1, "probs": [0.5, 0.5]},
           {"id": "nan", "y": 1, "probs": [np.nan, 0.5, 0.25, 0.25]}]
    # Three batches, one an Arrow table (as read from Parquet), one of dict rows, one mixed good and bad.
    table = pa.table({"id": [r["id"] for r in rows[:100]], "y": [r["y"] for r in rows[:100]],
                      "probs": pa.FixedSizeListArray.from_arrays(pa.array(np.stack([r["probs"] for r in rows[:100]])
                                                                          .ravel()), 4),
                      "group": [r["group"] for r in rows[:100]]})
    batches = [Batch(table, source="t.parquet", positions=range(1, 101)), Batch(rows[100:200]),
               Batch(rows[200:] + bad)]
    with beam.Pipeline() as p:
        metrics, failed = (p | beam.Create(batches, reshuffle=False)
                           | ev.Evaluate(num_classes=4, label_field="y", slice_fields=("group",))
                           .with_exception_handling())
        assert_that(failed | beam.Map(lambda d: (d["id"], d["stage"])),
                    equal_to([(b["id"], "eval") for b in bad]), label="dead letters")
        errors = failed | beam.Map(lambda d: (d["id"], d["error"])) | beam.combiners.ToDict()
        assert_that(metrics, lambda found: _check_metrics(found, rows, bad), label="metrics")
        assert_that(errors, _check_errors, label="errors")


def _check_metrics(found, rows, bad):
    [found] = found
    y = np.array([r["y"] for r in rows])
    probs = np.stack([r["probs"] for r in rows])
    pred = probs.argmax(1)
    assert found["rows_evaluated"] == len(rows) and found["rows_failed"] == len(bad)
    assert found["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), rel=1e-12)
    assert found["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), rel=1e-12)
    assert found["log_loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(4)), rel=1e-6)
    assert found["brier"] == pytest.approx(skm.brier_score_loss(y, probs, labels=range(4), scale_by_half=False),
                                           rel=1e-6)
    assert found["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()
    a = np.array([r["group"] == "a" for r in rows])
    assert found["slices"]["group"]["a"]["rows"] == a.sum()
    assert found["slices"]["group"]["b"]["accuracy"] == pytest.approx(skm.accuracy_score(y[~a], pred[~a]))


def _check_errors(found):
    [errors] = found
    assert "(id 'too-big'): field 'y' holds 4, outside the classes 0..3" in errors["too-big"]
    assert "field 'y' is missing or null; set --label-field" in errors["no-label"]
    assert "pass probabilities (softmax), not logits" in errors["logits"]
    assert "field 'probs' has shape [2], expected [4]" in errors["short"]
    assert "non-finite" in errors["nan"]


def test_without_exception_handling_a_bad_row_fails_the_pipeline():
    with pytest.raises(Exception, match="outside the classes 0..1"), beam.Pipeline() as p:
        _ = p | beam.Create([{"id": 1, "label": 2, "probs": [0.5, 0.5]}]) | ev.Evaluate(num_classes=2)


def test_gate_fails_only_beyond_the_interval_and_max_drop():
    metrics = {"accuracy": 0.90, "log_loss": 0.30, "macro_f1": 0.9, "brier": 0.1, "ece": 0.05,
               "bootstrap": {"intervals": {"accuracy": [0.88, 0.92], "log_loss": [0.25, 0.35]}}}
    base = {"accuracy": 0.95, "log_loss": 0.20, "macro_f1": 0.9, "brier": 0.1, "ece": 0.05}
    g = ev.gate(metrics, base, max_drop=0.02)
    assert g["metrics"]["accuracy"]["failed"] and g["metrics"]["log_loss"]["failed"] and not g["passed"]
    assert g["metrics"]["accuracy"]["delta"] == pytest.approx(-0.05)
    assert ev.gate(metrics, base, max_drop=0.03)["metrics"]["accuracy"]["failed"] is False  # 0.92 >= 0.95 - 0.03
    assert ev.gate(metrics, base, max_drop=0.06)["passed"]                                 # 0.25 <= 0.20 + 0.06
    # Without an interval the value itself is compared.
    assert ev.gate({"accuracy": 0.9}, {"accuracy": 0.95}, max_drop=0.04)["metrics"]["accuracy"]["failed"]
    assert not ev.gate({"accuracy": 0.9}, {"accuracy": 0.95}, max_drop=0.05)["metrics"]["accuracy"]["failed"]


@pytest.fixture(scope="module")
def digits_evals(tmp_path_factory):
    """The shipped digits test data evaluated three ways: 1 file, 7 files, 7 files on 2 worker processes
    with JSONL predictions."""
    root = tmp_path_factory.mktemp("eval")
    lines = [line for f in sorted(DIGITS.glob("test-*.jsonl")) for line in f.read_text().splitlines()]
    # Integer ids in the first 70 rows: the first of seven files holds only numbers, the one file a mix,
    # which Parquet stores as text; the bootstrap weighs the id 7 as the id "7".
    lines = [json.dumps({**json.loads(line), "id": i}) if i < 70 else line for i, line in enumerate(lines)]
    lines.append(json.dumps({"id": "not-a-digit", "pixels": [0] * 64, "label": 10}))  # set aside by eval
    lines.append(json.dumps({"id": "no-pixels", "label": 3}))  # a dead letter of the prediction run, counted once
    one = root / "one"
    one.mkdir()
    (one / "all.jsonl").write_text("\n".join(lines) + "\n")
    seven = root / "seven"
    seven.mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(lines)), 7)):
        (seven / f"part-{k}.jsonl").write_text("".join(lines[i] + "\n" for i in part))
    common = ["--model", "digits", "--label-field", "label", "--bootstrap", "200", "--seed", "7"]
    outs = {}
    runs = (("one", one, []), ("seven", seven, []), ("seven2", seven, [*TWO_WORKERS, "--format", "jsonl"]))
    for name, data, extra in runs:
        outs[name] = root / f"out-{name}"
        assert cli.main(["eval", *common, "--input", str(data / "*.jsonl"), "--output", str(outs[name]),
                         *extra]) == 0
    return outs


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_digits_end_to_end_equals_sklearn_on_the_predictions(digits_evals):
    out = digits_evals["one"]
    m = _metrics(out)
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (452, 451, 1)
    assert (m["rows_evaluated"], m["rows_failed_eval"], m["label_kept_as"]) == (450, 1, "true_label")
    [letter] = [json.loads(line) for f in out.glob("failed-eval-*.jsonl") for line in f.read_text().splitlines()]
    assert letter["id"] == "not-a-digit" and "field 'label' (kept as 'true_label') holds 10" in letter["error"]
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(sorted(map(str, (out / "predictions").glob("part-*.parquet")))).read()
    assert table.column_names == ["id", "true_label", "label", "probs"]
    keep = np.array(table["true_label"]) < 10
    y, probs = np.array(table["true_label"])[keep], np.stack(table["probs"].to_numpy(zero_copy_only=False))[keep]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)), rel=1e-12) and m["accuracy"] > 0.95
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs, labels=range(10)), rel=1e-6)
    assert m["per_class"]["support"] == np.bincount(y, minlength=10).tolist()
    lo, hi = m["bootstrap"]["intervals"]["accuracy"]
    assert lo < m["accuracy"] < hi and m["bootstrap"]["replicates"] == 200


@pytest.mark.slow
def test_one_file_seven_files_and_two_workers_give_identical_numbers(digits_evals):
    one, seven, seven2 = (_metrics(digits_evals[k]) for k in ("one", "seven", "seven2"))
    assert one == seven == seven2  # every number, bootstrap intervals included, exactly


@pytest.mark.slow
def test_baseline_gate_passes_and_fails_with_exit_3(digits_evals, tmp_path):
    base = digits_evals["one"]
    args = ["eval", "--model", "digits", "--input", str(DIGITS / "test-*.jsonl"), "--output", str(tmp_path / "o")]
    better = tmp_path / "better"
    better.mkdir()
    (better / "metrics.json").write_text(json.dumps({**_metrics(base), "accuracy": 1.0, "log_loss": 0.001}))
    assert cli.main([*args, "--baseline", str(better), "--max-drop", "0.001"]) == ev.GATE_FAILED_EXIT
    gate = _metrics(tmp_path / "o")["baseline"]
    assert not gate["passed"] and gate["metrics"]["accuracy"]["failed"] and gate["metrics"]["log_loss"]["failed"]
    assert not gate["metrics"]["brier"]["failed"]
    assert (tmp_path / "o" / "report.html").exists()  # written before the gate's verdict
    assert cli.main([*args, "--baseline", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_a_label_field_no_row_has_is_exit_1_with_every_row_set_aside(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["eval", "--model", "digits", "--input", str(DIGITS / "test-00000.jsonl"), "--output", str(out),
                     "--label-field", "digit"]) == 1
    assert "no row could be evaluated" in capsys.readouterr().err
    m = _metrics(out)
    assert (m["rows_evaluated"], m["rows_failed_eval"], m["accuracy"]) == (0, 150, None)
    letters = [json.loads(line) for f in out.glob("failed-eval-*.jsonl") for line in f.read_text().splitlines()]
    assert len(letters) == 150 and "field 'digit' is missing or null" in letters[0]["error"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
@pytest.mark.slow
def test_the_eval_report_renders_every_figure_in_chromium(digits_evals, tmp_path):
    shutil.copytree(digits_evals["one"], tmp_path / "r", ignore=shutil.ignore_patterns("predictions"))
    (tmp_path / "r" / "confusion_matrix.png").unlink()  # the HTML alone holds its figures
    result = render_html(tmp_path / "r" / "report.html")
    assert [i["alt"].split(" (")[0] for i in result["images"]] == [
        "Confusion matrix", "Reliability diagram", "Top-label confidence histogram", "Precision, recall and F1 per class"]
    assert all(i["complete"] and i["naturalWidth"] > 100 and i["naturalHeight"] > 100 for i in result["images"])
    assert {p.name for p in digits_evals["one"].glob("*.png")} == {
        "confusion_matrix.png", "reliability.png", "confidence_histogram.png", "per_class.png"}


TEXTS = [("The striker scored twice and the team won the football match", "sports"),
         ("The goalkeeper saved a penalty in the final minute of the game", "sports"),
         ("The tennis player won the championship after five sets", "sports"),
         ("Simmer the onions in butter, then add garlic and tomatoes", "cooking"),
         ("Bake the bread dough in a hot oven for forty minutes", "cooking"),
         ("Whisk the eggs with sugar and flour to make the cake batter", "cooking"),
         ("Heavy rain and strong winds are expected tomorrow afternoon", "weather"),
         ("A sunny morning will turn cloudy with a chance of snow tonight", "weather"),
         ("Temperatures will drop below freezing with frost overnight", "weather")]


@pytest.mark.slow
def test_minilm_is_evaluated_as_a_zero_shot_classifier(tmp_path, minilm):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t, "topic": c, "src": "ab"[i % 2]}) + "\n" for i, (t, c) in enumerate(TEXTS)))
    names = ["sports", "cooking", "weather"]
    out = tmp_path / "out"
    args = ["eval", "--model", "minilm", "--input", str(data), "--output", str(out), "--label-field", "topic"]
    assert cli.main(args) == 2  # an embedder needs --class-names
    assert cli.main([*args, "--class-names", ",".join(names), "--slice-field", "src"]) == 0
    m = _metrics(out)
    assert (m["rows_evaluated"], m["num_classes"], m["class_names"]) == (9, 3, names)
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(sorted(map(str, (out / "predictions").glob("part-*.parquet")))).read().sort_by("id")
    # probs = softmax(20 * cosine(text, class name)), from the same model's embeddings.
    texts = minilm.predict({"text": [t for t, _ in TEXTS]})["embedding"]
    classes = minilm.predict({"text": names})["embedding"]
    cos = (texts @ classes.T) / np.outer(np.linalg.norm(texts, axis=1), np.linalg.norm(classes, axis=1))
    expected = np.exp(20 * cos) / np.exp(20 * cos).sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack(table["probs"].to_numpy(zero_copy_only=False)), expected, atol=1e-5)
    y = np.array([names.index(c) for _, c in TEXTS])
    assert m["accuracy"] == pytest.approx(float(np.mean(expected.argmax(1) == y)))
    assert m["accuracy"] >= 2 / 3  # plainly topical sentences: zero-shot gets most of them
    assert m["slices"]["src"]["a"]["rows"] == 5 and m["slices"]["src"]["b"]["rows"] == 4


def test_eval_help_defines_the_gate_and_the_exit_status():
    text = " ".join(cli._parser().commands["eval"].format_help().split())
    assert "fails when the upper end of its interval (the value itself without --bootstrap) is below baseline - --max-drop" in text
    assert "3 the baseline gate failed" in text and "scale_by_half=False" in text


def test_a_slice_field_no_row_has_is_warned_about():
    result = {"slices": {"lang": {"null": {"rows": 9}}, "label": {"0": {"rows": 5}, "null": {"rows": 4}}}}
    [warning] = ev.empty_slice_warnings(result)
    assert "--slice-field lang is missing or null in every row" in warning
