"""`digits`: a small CNN for scikit-learn's 8x8 handwritten digits, as pure JAX over a nested-dict pytree.

    >>> params = load_params(weights_path())
    >>> out = classify(params, {"pixels": np.zeros((2, 8, 8), np.float32)})
    >>> out["label"].shape, out["probs"].shape
    ((2,), (2, 10))

Trained by scripts/train_digits.py on `sklearn.datasets.load_digits()` (1,797 images, values 0-16,
ink high) with the split `train_test_split(test_size=0.25, random_state=0, stratify=y)`; the weights ship
in the package (weights/digits.safetensors).  Layers (NHWC, "SAME" padding):

    pixels [B, 8, 8] / 16 -> conv3x3(1->16) relu -> conv3x3(16->32) relu -> maxpool 2x2 [B, 4, 4, 32]
      -> flatten [B, 512] -> dense(512->64) relu -> dense(64->10) logits -> softmax probs, argmax label
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from bulkinfer.models.weights import load_params

# The model's one input: name -> (shape of one row, dtype).
INPUTS = {"pixels": ((8, 8), "float32")}
NUM_CLASSES = 10
MAX_PIXEL = 16.0  # load_digits' values run 0..16


def weights_path() -> Path:
    """The shipped weights file (a package data file)."""
    return Path(__file__).parent / "weights" / "digits.safetensors"


def init_params(key: jax.Array) -> dict:
    """Random parameters (He-normal weights, zero biases) as a nested dict of float32 arrays."""
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)

    return {
        "conv1": {"w": he(k1, (3, 3, 1, 16), 9), "b": jnp.zeros(16)},          # HWIO
        "conv2": {"w": he(k2, (3, 3, 16, 32), 9 * 16), "b": jnp.zeros(32)},
        "dense1": {"w": he(k3, (4 * 4 * 32, 64), 512), "b": jnp.zeros(64)},
        "dense2": {"w": he(k4, (64, NUM_CLASSES), 64), "b": jnp.zeros(NUM_CLASSES)},
    }


def _conv(x, layer):
    y = jax.lax.conv_general_dilated(x, layer["w"], window_strides=(1, 1), padding="SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + layer["b"])


def logits(params: dict, pixels: jax.Array) -> jax.Array:
    """[B, 8, 8] float32 pixels (0-16) -> [B, 10] float32 logits."""
    x = (pixels.astype(jnp.float32) / MAX_PIXEL)[..., None]          # [B, 8, 8, 1]
    x = _conv(_conv(x, params["conv1"]), params["conv2"])             # [B, 8, 8, 32]
    b = x.shape[0]
    x = x.reshape(b, 4, 2, 4, 2, 32).max(axis=(2, 4))                 # [B, 4, 4, 32]
    x = x.reshape(b, 4 * 4 * 32)                                      # [B, 512]
    x = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"])  # [B, 64]
    return x @ params["dense2"]["w"] + params["dense2"]["b"]          # [B, 10]


def classify(params: dict, batch: dict) -> dict:
    """batch["pixels"]: float32 [B, 8, 8], values 0-16 as in `load_digits` (scaled here).

    Returns {"label": int32 [B], "probs": float32 [B, 10]} (softmax over the ten digits).  Pure: params
    are an argument, so `jax.jit(classify)` compiles once per batch size."""
    z = logits(params, batch["pixels"])
    return {"label": jnp.argmax(z, axis=-1).astype(jnp.int32), "probs": jax.nn.softmax(z, axis=-1)}


def load() -> dict:
    """The shipped parameters as a nested dict of numpy float32 arrays."""
    return load_params(str(weights_path()))



def spec(**settings):
    """The built-in `digits` model as a `JaxModel`: `classify` with the shipped weights (carried in the
    spec: 0.1 MB), input "pixels" float32 [8, 8] (64 numbers row-major also work), outputs "label" int32
    and "probs" float32 [10].  settings: JaxModel's (batch_size, warmup, compilation_cache_dir, ...)."""
    from bulkinfer.models.jax_model import JaxModel

    return JaxModel(fn=classify, params=load(), inputs=INPUTS, name="digits", **settings)
