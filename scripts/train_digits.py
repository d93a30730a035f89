"""Train the shipped `digits` classifier and write bulkinfer/models/weights/digits.safetensors.

Data: `sklearn.datasets.load_digits()` (bundled with scikit-learn, no download): 1,797 images of 8x8
pixels, values 0-16.  Split, documented and deterministic (tests/models/test_digits.py repeats it):

    train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)   # 1,347 train, 450 held out

Training: the CNN of bulkinfer/models/digits.py, softmax cross-entropy, plain JAX Adam (Kingma & Ba 2015,
Algorithm 1; no optax), minibatches of 64 shuffled by a fixed PRNG seed, a fixed number of epochs; the
held-out rows are never seen in training.  Prints the held-out accuracy.

    python scripts/train_digits.py            # ~15 s on 2 CPU cores; byte-identical output on rerun
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bulkinfer.models import digits
from bulkinfer.models.safetensors_file import save_safetensors


def split():
    """(x_train, x_test, y_train, y_test): the documented split; x float32 [N, 8, 8] (0-16), y int32 [N]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32)  # [1797, 8, 8]
    y = data.target.astype(np.int32)    # [1797]
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def _loss(params, x, y):
    z = digits.logits(params, x)                                   # [B, 10]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


@functools.partial(jax.jit, static_argnames=("lr",))
def _adam_step(params, m, v, t, x, y, *, lr):
    b1, b2, eps = 0.9, 0.999, 1e-8
    loss, g = jax.value_and_grad(_loss)(params, x, y)
    m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
    v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
    scale = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)                 # bias correction folded into the step
    params = jax.tree.map(lambda p, m_, v_: p - scale * m_ / (jnp.sqrt(v_) + eps), params, m, v)
    return params, m, v, loss


def train(*, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    """(params as numpy, held-out accuracy).  Deterministic for a given seed on one platform."""
    x_train, x_test, y_train, y_test = split()
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params = digits.init_params(init_key)
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    steps_per_epoch = len(x_train) // batch_size  # the remainder of each shuffled epoch is skipped
    t = 0
    for _ in range(epochs):
        key, perm_key = jax.random.split(key)
        order = np.asarray(jax.random.permutation(perm_key, len(x_train)))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            t += 1
            params, m, v, loss = _adam_step(params, m, v, t, x_train[idx], y_train[idx], lr=lr)
    labels = np.asarray(jax.jit(digits.classify)(params, {"pixels": x_test})["label"])
    return jax.tree.map(np.asarray, params), float(np.mean(labels == y_test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=digits.weights_path())
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params, accuracy = train(epochs=args.epochs, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(params, args.out)
    print(f"held-out accuracy {accuracy:.4f} on 450 rows; wrote {args.out}")


if __name__ == "__main__":
    main()
