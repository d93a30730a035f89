"""A small deterministic model for third-party Open Inference Protocol (v2) servers (MLServer here).

`text` BYTES [N] -> `n_bytes` INT32 [N] and `stats` FP32 [N, 3].  `features` (plain numpy, no server
imports) is the model's function, so a test can compute the expected outputs without a server.  An empty
text is refused with the server's own input error (HTTP 400); a text containing "\\x00" makes the model
crash (an unhandled exception, HTTP 500), as a buggy model would.
"""

from __future__ import annotations

import numpy as np

VOWELS = frozenset("aeiouAEIOU")


def features(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n_bytes [N] int32: UTF-8 bytes per text, stats [N, 3] float32: words, vowel fraction of the
    characters, mean UTF-8 byte value)."""
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], np.int32)  # [N]
    stats = np.zeros((len(texts), 3), np.float32)  # [N, 3]
    for i, t in enumerate(texts):
        raw = np.frombuffer(t.encode("utf-8"), np.uint8)
        stats[i] = (len(t.split()), sum(c in VOWELS for c in t) / max(len(t), 1), raw.mean() if raw.size else 0.0)
    return n_bytes, stats


def bad_row(texts: list[str]) -> tuple[int, str] | None:
    """(row, why) of the first text the model refuses (empty), or None."""
    return next(((i, "is empty") for i, t in enumerate(texts) if not t), None)


try:  # the MLServer runtime: only where MLServer is installed (its own venv)
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec, StringCodec
    from mlserver.errors import InferenceError
    from mlserver.types import InferenceRequest, InferenceResponse
except ImportError:
    MLModel = None

if MLModel is not None:

    class TextStats(MLModel):
        async def load(self) -> bool:
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            texts = StringCodec.decode_input(payload.inputs[0])
            bad = bad_row(texts)
            if bad is not None:
                raise InferenceError(f"row {bad[0]}: text {bad[1]}")
            if any("\x00" in t for t in texts):
                raise RuntimeError("the model crashed on a NUL character")
            n_bytes, stats = features(texts)
            return InferenceResponse(model_name=self.name, outputs=[
                NumpyCodec.encode_output("n_bytes", n_bytes), NumpyCodec.encode_output("stats", stats)])
