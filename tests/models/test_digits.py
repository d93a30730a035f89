import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from bulkinfer.models import digits

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_digits.py"


@pytest.fixture(scope="module")
def held_out():
    """The documented split, made here independently of the training script."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    return train_test_split(data.images.astype(np.float32), data.target, test_size=0.25, random_state=0,
                            stratify=data.target)


@pytest.fixture(scope="module")
def params():
    return digits.load()


def test_the_training_script_uses_the_documented_split(held_out):
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours = script.split()
    for got, want in zip(ours, held_out):
        np.testing.assert_array_equal(got, want)
    x_train, x_test, y_train, y_test = held_out
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 450
    # stratified: every digit's share of the held-out rows is within one row of its share overall
    overall = np.bincount(np.concatenate([y_train, y_test]), minlength=10) / 1797
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - overall * 450) <= 1)
    # and the held-out images are not among the training images
    train_rows = {x.tobytes() for x in x_train}
    assert sum(x.tobytes() in train_rows for x in x_test) <= 2  # load_digits holds a few exact duplicates


def test_shipped_weights_reach_the_held_out_accuracy(held_out, params):
    _, x_test, _, y_test = held_out
    out = jax.jit(digits.classify)(params, {"pixels": x_test})
    accuracy = float(np.mean(np.asarray(out["label"]) == y_test))
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.4f}"


def test_outputs_have_the_declared_shapes_and_probs_sum_to_one(held_out, params):
    _, x_test, _, _ = held_out
    (shape, dtype), = digits.INPUTS.values()
    assert list(digits.INPUTS) == ["pixels"] and x_test.shape[1:] == shape and x_test.dtype == dtype
    out = jax.jit(digits.classify)(params, {"pixels": x_test[:7]})
    label, probs = np.asarray(out["label"]), np.asarray(out["probs"])
    assert label.shape == (7,) and label.dtype == np.int32
    assert probs.shape == (7, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(label, probs.argmax(axis=1))


def test_a_row_does_not_depend_on_its_batch(held_out, params):
    _, x_test, _, _ = held_out
    together = np.asarray(digits.classify(params, {"pixels": x_test[:5]})["probs"])
    alone = np.stack([np.asarray(digits.classify(params, {"pixels": x_test[i:i + 1]})["probs"])[0]
                      for i in range(5)])
    np.testing.assert_allclose(alone, together, atol=1e-6)


def test_weights_ship_as_a_safetensors_file_with_the_model_layout(params):
    assert digits.weights_path().is_file() and digits.weights_path().suffix == ".safetensors"
    fresh = digits.init_params(jax.random.PRNGKey(1))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)
