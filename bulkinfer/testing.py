"""Helpers for tests and benchmarks: a deterministic synthetic corpus and a fake model.

    >>> texts = synthetic_texts(1000, seed=0)    # realistic skewed length mix, mostly short
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

_WORDS = (
    "the of and to in is for on that with as by at from this be are or it an was which data model "
    "inference batch pipeline beam worker row dataset embedding token shard accelerator device memory "
    "throughput latency queue server client request response error retry output input file parquet json "
    "vector search query document sentence language learning training evaluation metric label score "
    "customer order product price review support ticket email account payment shipping delivery refund "
    "weather city river mountain music film book author history science energy market report update "
    "quickly slowly carefully never always often today tomorrow yesterday because however although"
).split()


def synthetic_texts(n: int, *, seed: int = 0) -> list[str]:
    """n deterministic English-like texts with a skewed length mix: most 3-30 words, a tail up to ~400.

    With the MiniLM tokenizer the mean is about 30 tokens and the range 5 to 256+ (truncated).
    """
    rng = np.random.default_rng(seed)
    # Lognormal word counts: median ~12 words, 5% above ~70, a few in the hundreds.
    counts = np.clip(np.rint(rng.lognormal(mean=2.5, sigma=0.85, size=n)), 1, 420).astype(int)
    words = np.array(_WORDS)
    texts = []
    for i, c in enumerate(counts):
        picked = words[rng.integers(0, len(words), size=c)]
        text = " ".join(picked)
        texts.append(text[0].upper() + text[1:] + ("." if i % 3 else "?"))
    return texts


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountingModel:
    """A trivial model (length of each text) that counts how often it is loaded in this process.

    For tests of sharing and framework overhead; `fail_on` makes predict raise on texts containing it.
    """

    name: str = "counting"
    fail_on: str | None = None

    loads = 0  # class-level: loads in this process
    _lock = threading.Lock()

    def load(self):
        with CountingModel._lock:
            CountingModel.loads += 1
        return _LoadedCounting(self.fail_on)


class _LoadedCounting:
    input_type = str
    output_name = "length"
    load_s = 0.0

    def __init__(self, fail_on):
        self._fail_on = fail_on

    def predict(self, texts, stats=None):
        if self._fail_on is not None and any(self._fail_on in t for t in texts):
            raise RuntimeError(f"injected failure on a text containing {self._fail_on!r}")
        return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
