"""Helpers for tests and benchmarks: a deterministic synthetic corpus, a fake model, a tiny BERT, and
fakes of a device out of memory (at compile: `out_of_memory_above`; while running: `OutOfMemoryWhileRunning`).

    >>> texts = synthetic_texts(1000, seed=0)    # realistic skewed length mix, mostly short
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from bulkinfer.models.signature import TEXT, TensorSpec

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
    output_name = "length"
    input_signature = (TensorSpec("text", (), TEXT),)

    loads = 0  # class-level: loads in this process
    _lock = threading.Lock()

    def load(self):
        with CountingModel._lock:
            CountingModel.loads += 1
        return _LoadedCounting(self.fail_on)


class _LoadedCounting:
    """The model contract (`bulkinfer.models.signature`): {"text": N strings} -> {"length": [N] int64}."""

    inputs = (TensorSpec("text", (), TEXT),)
    outputs = (TensorSpec("length", (), "int64"),)
    load_s = 0.0
    name = "counting"

    def __init__(self, fail_on):
        self._fail_on = fail_on

    def predict(self, inputs, stats=None):
        texts = inputs["text"]
        if self._fail_on is not None and any(self._fail_on in t for t in texts):
            raise RuntimeError(f"injected failure on a text containing {self._fail_on!r}")
        return {"length": np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))}


def out_of_memory_above(fn, max_rows: int):
    """`fn` for an Engine, failing like a device out of memory when compiling batches of more than max_rows rows.

    Compiling such a shape raises XLA's error (jax.errors.JaxRuntimeError, RESOURCE_EXHAUSTED), as
    XLA does when a program's buffers cannot fit in device memory.  Smaller batches run `fn` as is.

        >>> engine = Engine(out_of_memory_above(fn, 8), params, inputs=..., bucketing=Bucketing(...))
    """
    import jax

    def wrapped(params, batch):
        rows = jax.tree.leaves(batch)[0].shape[0]  # static: decided once per compiled shape
        if rows > max_rows:
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: injected out of memory on a batch of {rows} rows (limit {max_rows})")
        return fn(params, batch)

    return wrapped


class OutOfMemoryWhileRunning:
    """An Engine `clock` whose batches of more than max_rows rows fail while they run, as on a GPU.

    The batch compiles and is dispatched normally; the failure (jax.errors.JaxRuntimeError,
    RESOURCE_EXHAUSTED, the status XLA reports when a running program cannot allocate its buffers)
    surfaces only when the engine awaits the result, through the ticket the clock hands back.
    `failures` counts the batches failed so far.

        >>> engine = Engine(fn, params, inputs=..., bucketing=..., clock=OutOfMemoryWhileRunning(8))
    """

    def __init__(self, max_rows: int):
        from bulkinfer.runtime.busy import BusyClock

        self.max_rows = max_rows
        self.failures = 0
        self._clock = BusyClock(wait_for=self._wait_for)

    def track(self, output):
        return self._clock.track(output)

    def _wait_for(self, output) -> None:
        import jax

        jax.block_until_ready(output)  # the batch really runs; its result is discarded, as a failed one's would be
        rows = jax.tree.leaves(output)[0].shape[0]
        if rows > self.max_rows:
            self.failures += 1
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: injected out of memory while running a batch of {rows} rows "
                f"(limit {self.max_rows})")


# The Engine `inputs` of `tiny_bert`'s function: token ids with a variable length.
TINY_BERT_INPUTS = {"input_ids": ((None,), "int32")}


def tiny_bert(*, seed: int = 0, vocab: int = 101, hidden: int = 32, layers: int = 2, heads: int = 4,
              intermediate: int = 64, max_position: int = 128):
    """(fn, params): a randomly initialized BERT encoder small enough to compile in well under a second.

    fn(params, {"input_ids": [B, L] int32, "mask": [B, L] int32}) -> [B, hidden] mean-pooled, normalized
    float32 vectors, the same function TextEmbedder runs (`text.embed_batch`); params use the layout of
    `bulkinfer.models.bert`.  Run it with `TINY_BERT_INPUTS`.
    """
    import functools

    from bulkinfer.models import bert
    from bulkinfer.models.text import embed_batch

    config = bert.BertConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                             intermediate_size=intermediate, max_position=max_position)
    rng = np.random.default_rng(seed)
    d, f, n = hidden, intermediate, layers

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    params = {
        "embeddings": {"word": w(vocab, d), "position": w(max_position, d), "token_type": w(2, d),
                       "ln_scale": 1 + w(d), "ln_bias": w(d)},
        "layers": {"qkv_w": w(n, d, 3 * d), "qkv_b": w(n, 3 * d), "out_w": w(n, d, d), "out_b": w(n, d),
                   "ln1_scale": 1 + w(n, d), "ln1_bias": w(n, d), "ffn_in_w": w(n, d, f), "ffn_in_b": w(n, f),
                   "ffn_out_w": w(n, f, d), "ffn_out_b": w(n, d), "ln2_scale": 1 + w(n, d), "ln2_bias": w(n, d)},
    }
    fn = functools.partial(embed_batch, config=config, pooling="mean", normalize=True)
    return fn, params


def random_token_rows(n: int, *, max_len: int, vocab: int = 101, seed: int = 0) -> list[np.ndarray]:
    """n int32 token sequences with a skewed length mix between 1 and max_len (for engine tests)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(max_len / 6), 0.8, n).astype(int), 1, max_len)
    return [rng.integers(1, vocab, size=k).astype(np.int32) for k in lengths]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


TINY_CLASSIFIER_INPUTS = {"pixels": ((4, 3), "float32")}


def tiny_classifier(params, batch):
    """A JaxModel function for tests: {"pixels": float32 [B, 4, 3]} -> {"score": float32 [B, 2], "label": int32 [B]}."""
    import jax.numpy as jnp

    x = batch["pixels"].reshape(batch["pixels"].shape[0], -1)  # [B, 12]
    score = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])  # [B, 2]
    return {"score": score, "label": jnp.argmax(score, -1).astype(jnp.int32)}


def tiny_classifier_params(seed: int = 0) -> dict:
    """Random parameters for `tiny_classifier`: {"dense": {"w": [12, 2], "b": [2]}} float32."""
    rng = np.random.default_rng(seed)
    return {"dense": {"w": rng.standard_normal((12, 2)).astype(np.float32),
                      "b": rng.standard_normal(2).astype(np.float32)}}


def kill_after_first_commit(cmd: list[str], out_dir, env: dict | None = None, sig: int | None = None
                            ) -> tuple[int, str]:
    """Runs `cmd` (a `bulkinfer run` or a script running a job into `out_dir`) and sends it signal `sig`
    (default SIGKILL: a crash mid-job; SIGINT: Ctrl-C) as soon as a first commit record appears in
    out_dir/_committed/ (or when it exits first).  Returns its exit status and its stderr."""
    import os
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    committed = Path(out_dir) / "_committed"
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=err,  # SIGINT as a terminal delivers it,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even under nohup
        try:
            while not list(committed.glob("[!.]*.json")) and proc.poll() is None:  # polls a file, not a timer
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if sig is None else sig)
            proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


CHROMIUM = "/usr/bin/chromium"
_RENDER_PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight, src: img.src.slice(0, 32)};
  });
  var out = document.createElement("pre");
  out.id = "bulkinfer-render";
  out.textContent = JSON.stringify({title: document.title, images: images,
                                    headings: document.querySelectorAll("h1, h2, h3").length,
                                    tables: document.querySelectorAll("table").length});
  document.body.appendChild(out);
});
</script>"""


def render_html(path, *, chromium: str = CHROMIUM, timeout_s: float = 60.0) -> dict:
    """Loads the HTML file `path` in headless Chromium and reports what the browser made of it.

    Returns {"title": str, "headings": int, "tables": int, "images": [{"alt", "complete", "naturalWidth",
    "naturalHeight", "src" (its first 32 characters)}, ...]}: an image rendered when complete is true
    and naturalWidth > 0.  The page is loaded from a copy with a small script appended that, on the
    load event, writes these facts into the DOM, which `--dump-dom` then prints; the original file is
    not changed.  Chromium runs with no network use (--disable-background-networking ...) and a fresh
    profile.  Raises FileNotFoundError when `chromium` is missing (Debian: apt-get install chromium) and
    RuntimeError when Chromium fails or prints no result.
    """
    import json
    import os
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    if not os.path.exists(chromium):
        raise FileNotFoundError(f"{chromium} is missing; install Debian's chromium (apt-get install chromium)")
    page = Path(path).read_text(encoding="utf-8")
    cut = page.rfind("</body>")
    probed = page[:cut] + _RENDER_PROBE + page[cut:] if cut >= 0 else page + _RENDER_PROBE
    with tempfile.TemporaryDirectory(prefix="bulkinfer-chromium-") as tmp:
        copy = Path(path).resolve().parent / f".render-{os.getpid()}-{Path(path).name}"
        copy.write_text(probed, encoding="utf-8")
        try:
            proc = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp}", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
                capture_output=True, text=True, timeout=timeout_s)
        finally:
            copy.unlink()
    found = re.search(r'<pre id="bulkinfer-render">(.*?)</pre>', proc.stdout, re.S)
    if found is None:
        raise RuntimeError(f"chromium printed no render result for {path} (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    import html as _html

    return json.loads(_html.unescape(found.group(1)))
