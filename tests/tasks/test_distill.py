"""distill: teacher top-k at a temperature (digits) and embeddings (MiniLM) as shards that read back
without bulkinfer (Grain over ArrayRecord, pyarrow over Parquet), with a manifest that checks out."""

import hashlib
import json
import os
import shutil

import msgpack
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.special import log_softmax, softmax

from bulkinfer.beam.shards import decode_record
from bulkinfer.cli import main
from bulkinfer.models import digits
from bulkinfer.tasks import distill as d
from bulkinfer.tasks.run import JobFailed, JobSpec

TEXTS = ["A cat sat on the mat.", "Stock markets fell sharply today.", "The recipe needs two eggs.",
         "Rain is expected tomorrow.", "She scored the winning goal.", "Quantum computers use qubits.",
         "The museum opens at nine.", "He plays the violin.", "Traffic was heavy this morning."]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_manifest(out, manifest) -> None:
    """COMPLETED names the manifest's sha256; every shard's bytes, sha256 and row count check out."""
    assert json.loads((out / "COMPLETED").read_text())["manifest_sha256"] == sha256(out / "manifest.json")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        path = out / shard["path"]
        assert (os.path.getsize(path), sha256(path)) == (shard["bytes"], shard["sha256"])
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] == manifest["rows_out"]
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_failed"]


def test_teacher_top_k_equals_numpy_on_the_same_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 12)) * 4  # [N, C]
    probs = softmax(logits, axis=1).astype(np.float32)
    probs[0] = 0
    probs[0, [3, 7]] = 0.5  # a tie and classes of probability 0 (log-probability -inf at any T)
    for temperature in (0.5, 1.0, 4.0):
        with np.errstate(divide="ignore"):
            expected = log_softmax(np.log(probs.astype(np.float64)) / temperature, axis=1)  # [N, C]
        for k in (1, 5, 12, 20):
            idx, lp, rest = d.teacher_top_k(probs, k, temperature)
            assert idx.dtype == np.int32 and lp.dtype == rest.dtype == np.float32 and idx.shape == (64, min(k, 12))
            np.testing.assert_allclose(lp, -np.sort(-expected, axis=1)[:, :min(k, 12)], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.take_along_axis(expected, idx, axis=1), lp, rtol=1e-6, atol=1e-6)
            assert all(len(set(row)) == len(row) for row in idx.tolist())
            np.testing.assert_allclose(rest + np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)
            assert idx[0, 0] == 3 and (k < 2 or idx[0, 1] == 7)  # ties: the lower class first
        # From the probabilities as from the logits: log_softmax(log(p) / T) == log_softmax(logits / T).
        _, lp, _ = d.teacher_top_k(softmax(logits[1:], axis=1), 3, temperature)
        np.testing.assert_allclose(lp, -np.sort(-log_softmax(logits[1:] / temperature, axis=1), axis=1)[:, :3],
                                   atol=1e-5)


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    """The CLI over two JSONL files of digits (30 rows each) and one bad row, as ArrayRecord shards."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    for k in range(2):
        with open(root / f"in-{k}.jsonl", "w") as f:
            for i in range(30 * k, 30 * k + 30):
                f.write(json.dumps({"id": i, "pixels": data.data[i].tolist(), "target": int(data.target[i])}) + "\n")
            if k:
                f.write(json.dumps({"id": 999, "pixels": [1, 2, 3]}) + "\n")
    out = root / "out"
    args = ["distill", "--model", "digits", "--input", str(root / "in-*.jsonl"), "--output", str(out),
            "--keep-fields", "target", "--top-k", "3", "--temperature", "2", "--format", "array_record",
            "--rows-per-shard", "16"]
    assert main(args) == 0
    return out, args, data


def test_digits_array_record_shards_read_back_with_grain(digits_job):
    import grain
    from array_record.python.array_record_module import ArrayRecordReader
    from grain.python import ArrayRecordDataSource

    out, _, data = digits_job
    manifest = json.loads((out / "manifest.json").read_text())
    check_manifest(out, manifest)
    spec = digits.spec()
    assert manifest["teacher"] == {"name": "digits", "digest": spec.digest, "weights_digest": spec.params_digest}
    assert (manifest["kind"], manifest["top_k"], manifest["temperature"], manifest["format"]) == (
        "classifier", 3, 2.0, "array_record")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"]) == (61, 60, 1)
    letters = [json.loads(x) for f in out.glob("predictions/failed-*.jsonl") for x in f.read_text().splitlines()]
    assert [x["id"] for x in letters] == [999]
    assert {f["name"]: (f["dtype"], f["shape"]) for f in manifest["schema"]} == {
        "id": ("int64", []), "target": ("int64", []), "label": ("int32", []), "top_k_indices": ("int32", [3]),
        "top_k_logprobs": ("float32", [3]), "rest_mass": ("float32", [])}
    assert [s["rows"] for s in manifest["shards"]] == [16, 14, 16, 14]  # 30 rows per unit, 16 per shard
    paths = [str(out / s["path"]) for s in manifest["shards"]]
    for path, shard in zip(paths, manifest["shards"]):
        reader = ArrayRecordReader(path)
        assert reader.num_records() == shard["rows"]
        reader.close()

    def decode(record):  # as a trainer would, without bulkinfer
        row = msgpack.unpackb(record)
        for f in manifest["schema"]:
            if f["shape"]:
                row[f["name"]] = np.frombuffer(row[f["name"]], np.dtype(f["dtype"]).newbyteorder("<"))
        return row

    rows = list(grain.MapDataset.source(ArrayRecordDataSource(paths)).map(decode))
    ours = decode_record(ArrayRecordDataSource(paths[:1])[0], manifest["schema"])
    assert ours["id"] == 0 and ours["top_k_indices"].dtype == np.int32 and ours["top_k_indices"].shape == (3,)
    assert [r["id"] for r in rows] == list(range(60))  # input order
    assert [r["target"] for r in rows] == data.target[:60].tolist()
    # The same rows' probabilities computed apart from the job, then numpy's top-k at T = 2.
    probs = np.asarray(digits.classify(digits.load(), {"pixels": data.data[:60].reshape(-1, 8, 8).astype(np.float32)})
                       ["probs"], np.float64)
    expected = log_softmax(np.log(probs) / 2.0, axis=1)  # [60, 10]
    idx = np.stack([r["top_k_indices"] for r in rows])
    lp = np.stack([r["top_k_logprobs"] for r in rows])
    np.testing.assert_allclose(lp, -np.sort(-expected, axis=1)[:, :3], atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(expected, idx, axis=1), lp, atol=1e-4)
    assert [r["label"] for r in rows] == idx[:, 0].tolist()
    rest = np.array([r["rest_mass"] for r in rows])
    np.testing.assert_allclose(rest + np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)
    assert (rest > 0).all()


def test_a_completed_job_is_a_no_op_other_settings_are_refused_and_lost_shards_come_back(digits_job, capsys):
    out, args, _ = digits_job
    manifest = json.loads((out / "manifest.json").read_text())
    stamp = os.stat(out / "COMPLETED").st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_completed"] is True
    assert os.stat(out / "COMPLETED").st_mtime_ns == stamp

    assert main([*args, "--top-k", "4"]) == 2
    assert "top_k 3 (now 4)" in capsys.readouterr().err and (out / "COMPLETED").exists()

    # An interruption after some shards: a rerun writes the missing unit's shards again, byte for byte.
    lost = manifest["shards"][2]["path"]
    unit = lost.split("-")[1]
    for name in ("COMPLETED", "manifest.json", f"shards/_units/{unit}.json", lost):
        (out / name).unlink()
    shutil.copy(out / manifest["shards"][0]["path"], out / "shards" / "shard-orphan-00000.array_record")
    assert main(args) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again == manifest
    check_manifest(out, again)
    assert not (out / "shards" / "shard-orphan-00000.array_record").exists()

    assert main([*args, "--top-k", "4", "--overwrite"]) == 0  # starts again with the new settings
    redone = json.loads((out / "manifest.json").read_text())
    check_manifest(out, redone)
    assert redone["top_k"] == 4 and redone["rows"] == 60 and redone["shards"] != manifest["shards"]


def test_a_probs_field_that_is_not_there_stops_the_job(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "pixels": [0.0] * 64}) + "\n")
    job = JobSpec(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"))
    with pytest.raises(JobFailed, match="neither 'logits'.*set --probs-field"):
        d.distill("digits", job, d.DistillSpec(probs_field="logits"))
    assert not (tmp_path / "out" / "COMPLETED").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_minilm_embeddings_as_parquet_shards(tmp_path, minilm_spec, minilm):
    for k, (lo, hi) in enumerate([(0, 5), (5, 9)]):
        (tmp_path / f"in-{k}.jsonl").write_text(
            "".join(json.dumps({"id": f"t{i}", "text": TEXTS[i]}) + "\n" for i in range(lo, hi)))
    out = tmp_path / "out"
    job = JobSpec(input=str(tmp_path / "in-*.jsonl"), output=str(out))
    manifest = d.distill(minilm_spec, job, d.DistillSpec(format="parquet", rows_per_shard=3))
    check_manifest(out, manifest)
    assert (manifest["kind"], manifest["top_k"], manifest["temperature"]) == ("embedder", None, None)
    assert manifest["teacher"]["digest"] == minilm_spec.digest
    assert {f["name"]: (f["dtype"], f["shape"]) for f in manifest["schema"]} == {
        "id": ("string", []), "embedding": ("float32", [384])}
    tables = [pq.read_table(out / s["path"]) for s in manifest["shards"]]
    assert [t.num_rows for t in tables] == [s["rows"] for s in manifest["shards"]] == [3, 2, 3, 1]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert ids == [f"t{i}" for i in range(9)]
    got = np.stack([np.asarray(v, np.float32) for t in tables for v in t.column("embedding").to_pylist()])
    np.testing.assert_allclose(got, minilm.embed(TEXTS), atol=1e-5)

    # An input that changes after COMPLETED is refused; before it (an interrupted job), its unit is redone.
    with open(tmp_path / "in-1.jsonl", "a") as f:
        f.write(json.dumps({"id": "t9", "text": "One more line."}) + "\n")
    with pytest.raises(d.JobRefused, match="completed distillation of other inputs"):
        d.distill(minilm_spec, job, d.DistillSpec(format="parquet", rows_per_shard=3))
    (out / "COMPLETED").unlink()
    again = d.distill(minilm_spec, job, d.DistillSpec(format="parquet", rows_per_shard=3))
    check_manifest(out, again)
    assert again["shards"][:2] == manifest["shards"][:2]  # the unchanged file's shards are kept as they were
    assert [s["rows"] for s in again["shards"]] == [3, 2, 3, 2] and again["rows_in"] == 10
    assert sorted(p.name for p in (out / "shards").glob("shard-*")) == sorted(
        s["path"].split("/")[1] for s in again["shards"])


def test_help_names_the_flags_and_the_outputs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("--top-k", "--temperature", "array_record", "--probs-field", "--embedding-field",
                 "--rows-per-shard", "--keep-fields", "manifest.json", "COMPLETED", "log_softmax(logits / T)"):
        assert word in text
