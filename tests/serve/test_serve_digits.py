"""`bulkinfer serve --model digits` in its own process, driven by tritonclient (FP32 pixels [N, 8, 8] ->
label INT32 [N] and probs FP32 [N, 10]) and by `bulkinfer run --model digits --server URL`: the same
predictions as the model run locally."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from bulkinfer.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """The first 48 of scikit-learn's 8x8 digits: float32 [48, 8, 8], values 0-16."""
    from sklearn.datasets import load_digits

    return load_digits().images[:48].astype(np.float32)


@pytest.fixture(scope="module")
def local(pixels) -> dict[str, np.ndarray]:
    """The digits model run in this process: {"label": int32 [48], "probs": float32 [48, 10]}."""
    from bulkinfer.models.resolve import model_spec

    return model_spec("digits").load().predict({"pixels": pixels})


@pytest.fixture(scope="module")
def digits_server(module_server_process):
    return module_server_process(model="digits")


def test_metadata_says_pixels_fp32_in_label_int32_and_probs_fp32_out(digits_server):
    meta = triton.InferenceServerClient(digits_server.url.removeprefix("http://")).get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert sorted(meta["outputs"], key=lambda t: t["name"]) == [
        {"name": "label", "datatype": "INT32", "shape": [-1]},
        {"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_predictions_equal_local(digits_server, pixels, local, binary):
    client = triton.InferenceServerClient(digits_server.url.removeprefix("http://"))
    rows = pixels if binary else pixels[:5]  # JSON: a few rows
    inp = triton.InferInput("pixels", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=binary)
    outputs = [triton.InferRequestedOutput("label", binary_data=binary),
               triton.InferRequestedOutput("probs", binary_data=binary)]
    result = client.infer("digits", [inp], outputs=outputs)
    label, probs = result.as_numpy("label"), result.as_numpy("probs")
    assert label.dtype == np.int32 and label.shape == (len(rows),)
    assert probs.dtype == np.float32 and probs.shape == (len(rows), 10)
    np.testing.assert_array_equal(label, local["label"][: len(rows)])
    np.testing.assert_allclose(probs, local["probs"][: len(rows)], atol=1e-5)  # batch shapes may differ


def test_run_with_server_writes_the_local_labels(digits_server, pixels, local, tmp_path):
    data = tmp_path / "digits.jsonl"
    data.write_text("".join(json.dumps({"id": i, "pixels": p.ravel().tolist()}) + "\n" for i, p in enumerate(pixels)))
    out = tmp_path / "out"
    assert main(["run", "--model", "digits", "--server", digits_server.url, "--input", str(data),
                 "--output", str(out), "--format", "jsonl"]) == 0
    rows = sorted((json.loads(line) for f in out.glob("part-*.jsonl") for line in f.read_text().splitlines()),
                  key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(pixels)))
    assert [r["label"] for r in rows] == local["label"].tolist()
    np.testing.assert_allclose(np.array([r["probs"] for r in rows], np.float32), local["probs"], atol=1e-5)
