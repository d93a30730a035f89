"""The engine over any JAX function: fixed-shape inputs planned by rows, and variable axes that are not
token sequences.  Outputs are compared with the function called directly on the unpadded rows."""

import functools
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bulkinfer.runtime import Bucketing, BusyClock, Engine, EngineStats
from bulkinfer.testing import OutOfMemoryWhileRunning, out_of_memory_above

PIXELS = {"pixels": ((4, 4), "float32"), "scale": ((2,), "float32")}
ROWS8 = Bucketing.for_rows(batch_size=8, ladder=3)  # batch sizes 8, 4, 2, 1


def classify(params, batch, *, temperature):
    """{"probs": [B, 3] float32, "label": [B] int32} from pixels [B, 4, 4] and scale [B, 2]."""
    x = batch["pixels"].reshape(batch["pixels"].shape[0], 16) * batch["scale"][:, :1]  # [B, 16]
    logits = (x @ params["w"] + params["b"]) / temperature + batch["scale"][:, 1:]  # [B, 3]
    return {"probs": jax.nn.softmax(logits, axis=-1), "label": jnp.argmax(logits, -1).astype(jnp.int32)}


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((16, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    return functools.partial(classify, temperature=2.0), params


def images(n, seed=1):
    rng = np.random.default_rng(seed)
    return {"pixels": rng.standard_normal((n, 4, 4)).astype(np.float32),
            "scale": rng.uniform(0.5, 2.0, (n, 2)).astype(np.float32)}


def direct(fn, params, inputs):
    """fn called on the rows themselves, one unpadded batch."""
    return {k: np.asarray(v) for k, v in jax.jit(fn)(params, inputs).items()}


def test_for_rows_ladder_and_its_checks():
    b = Bucketing.for_rows()
    assert b.shapes() == [(256, 1), (128, 1), (64, 1), (32, 1)]
    with pytest.raises(ValueError, match="batch_size 100 is not a power of two; use 64 or 128"):
        Bucketing.for_rows(batch_size=100)


def test_fixed_shapes_with_a_dict_output_match_fn_for_every_tail_size(model):
    fn, params = model
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8)
    assert engine.output_spec() == {"probs": ((3,), "float32"), "label": ((), "int32")}
    engine.warmup()
    assert engine.stats.compiles == 4
    data = images(40)
    reference = direct(fn, params, data)
    for n in range(1, 18):  # two full batches and every tail size 0..7
        call = EngineStats()
        out = engine.run({k: v[:n] for k, v in data.items()}, stats=call)
        assert sorted(out) == ["label", "probs"]
        assert out["label"].dtype == np.int32 and out["probs"].shape == (n, 3)
        np.testing.assert_allclose(out["probs"], reference["probs"][:n], atol=1e-5)
        np.testing.assert_array_equal(out["label"], reference["label"][:n])
        # Rows are the "tokens": each tail padded to the smallest batch size that holds it.
        tail = n % 8
        assert call.real_tokens == n and call.padded_tokens == 8 * (n // 8) + (1 << (tail - 1).bit_length() if tail else 0)
        assert call.compiles == 0
    assert engine.stats.compiles == 4


def test_rows_given_as_lists_of_arrays_and_wider_dtypes_are_cast(model):
    fn, params = model
    data = images(5)
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8)
    out = engine.run({"pixels": [p.astype(np.float64) for p in data["pixels"]], "scale": data["scale"].tolist()})
    np.testing.assert_allclose(out["probs"], direct(fn, params, data)["probs"], atol=1e-5)


def test_a_single_array_output_goes_to_output_name():
    def double(params, batch):
        return batch["x"] * params  # [B, 3]

    engine = Engine(double, np.float32(2), inputs={"x": ((3,), "float32")}, bucketing=ROWS8, output_name="twice")
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    assert engine.output_spec() == {"twice": ((3,), "float32")}
    out = engine.run({"x": x})
    assert list(out) == ["twice"]
    np.testing.assert_array_equal(out["twice"], 2 * x)


def masked_stats(params, batch):
    """Over a variable axis that is not the first of its input: frames [B, 3, L] and ids [B, L], plus a
    fixed bias [B, 2]: {"sum": [B, 3] masked sums of frames, "ids": [B] masked sum of ids * bias[0]}."""
    mask = batch["mask"]  # [B, L]
    frames = batch["frames"] * mask[:, None, :]  # [B, 3, L]
    ids = (batch["ids"] * mask).sum(-1)  # [B]
    return {"sum": frames.sum(-1) * params, "ids": ids * batch["bias"][:, 0] + batch["bias"][:, 1]}


VARIABLE = {"frames": ((3, None), "float32"), "ids": ((None,), "int32"), "bias": ((2,), "float32")}


def variable_rows(n, seed=2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n)
    return {"frames": [rng.standard_normal((3, k)).astype(np.float32) for k in lengths],
            "ids": [rng.integers(0, 50, k).astype(np.int32) for k in lengths],
            "bias": rng.standard_normal((n, 2)).astype(np.float32)}


def test_variable_axes_that_are_not_tokens_match_fn_row_by_row():
    engine = Engine(masked_stats, np.float32(3), inputs=VARIABLE, pad_values={"frames": 99.0, "ids": -5},
                    bucketing=Bucketing(lengths=(2, 4, 8), token_budget=16, max_batch=8, ladder=1))
    data = variable_rows(37)
    out = engine.run(data)
    for i in range(37):
        one = {"frames": data["frames"][i][None], "ids": data["ids"][i][None], "bias": data["bias"][i : i + 1],
               "mask": np.ones((1, len(data["ids"][i])), np.int32)}
        exact = direct(masked_stats, np.float32(3), one)
        np.testing.assert_allclose(out["sum"][i], exact["sum"][0], atol=1e-5, err_msg=f"row {i}")
        np.testing.assert_allclose(out["ids"][i], exact["ids"][0], atol=1e-5, err_msg=f"row {i}")


class FailingAtDispatch:
    """An Engine clock that raises `error(rows)` on the dispatch thread, as the executable's call would,
    for batches of more than max_rows rows (`times` times at most), and times the others with a BusyClock."""

    def __init__(self, max_rows: int, error=None, times: int | None = None):
        self.max_rows, self.times, self.failures = max_rows, times, 0
        self.error = error or (lambda rows: jax.errors.JaxRuntimeError(
            f"RESOURCE_EXHAUSTED: injected out of memory dispatching a batch of {rows} rows"))
        self._clock, self._lock = BusyClock(), threading.Lock()

    def track(self, output):
        rows = jax.tree.leaves(output)[0].shape[0]
        with self._lock:
            fail = rows > self.max_rows and (self.times is None or self.failures < self.times)
            self.failures += fail
        if fail:
            raise self.error(rows)
        return self._clock.track(output)


@pytest.mark.parametrize("inject", ["compile", "dispatch", "run"])
def test_out_of_memory_on_fixed_shapes_backs_off_and_loses_no_row(model, inject, caplog):
    fn, params = model
    if inject == "compile":
        engine = Engine(out_of_memory_above(fn, 2), params, inputs=PIXELS, bucketing=ROWS8)
    else:
        clock = OutOfMemoryWhileRunning(max_rows=2) if inject == "run" else FailingAtDispatch(max_rows=2)
        engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8, clock=clock)
    data = images(29)
    stats = EngineStats()
    with caplog.at_level(logging.WARNING, logger="bulkinfer.runtime.engine"):
        out = engine.run(data, stats=stats)
    np.testing.assert_allclose(out["probs"], direct(fn, params, data)["probs"], atol=1e-5)
    assert stats.rows == 29 and stats.oom_backoffs >= 1
    assert engine.bucketing.batch_sizes(1)[0] == 2  # 8 -> 4 -> 2 rows
    if inject != "compile":
        assert clock.failures == stats.oom_backoffs
    assert any("halving the token budget" in r.getMessage() for r in caplog.records)


def test_an_error_on_a_dispatch_thread_is_raised_and_the_engine_runs_again(model):
    fn, params = model
    clock = FailingAtDispatch(max_rows=0, error=lambda rows: ValueError(f"broken batch of {rows} rows"), times=1)
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8, clock=clock)
    data = images(29)
    with pytest.raises(ValueError, match="broken batch of 8 rows"):
        engine.run(data)
    assert engine.stats.oom_backoffs == 0 and engine.bucketing.batch_sizes(1)[0] == 8  # not taken for an OOM
    out = engine.run(data)  # the failed run left no batch behind on the dispatch threads
    np.testing.assert_allclose(out["probs"], direct(fn, params, data)["probs"], atol=1e-5)


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_each_batch_in_flight_is_dispatched_by_a_thread_of_its_own(max_in_flight):
    """A dispatch call returns before its batch is computed, so a pool that hands work to any idle thread
    would put batches in flight on one thread, where XLA:CPU runs them one after another."""
    lock, thread_of = threading.Lock(), {}  # batch index -> the thread that dispatched it

    class Recording(BusyClock):
        def track(self, output):
            first_row = int(np.asarray(output["output"])[0])  # the rows are numbered: row // 8 is the batch
            with lock:
                thread_of[first_row // 8] = threading.get_ident()
            return super().track(output)

    engine = Engine(lambda params, batch: batch["x"] * params["one"], {"one": np.int32(1)},
                    inputs={"x": ((), "int32")}, bucketing=ROWS8, clock=Recording(), max_in_flight=max_in_flight)
    x = np.arange(8 * 20, dtype=np.int32)  # 20 batches of 8 rows, planned in order
    np.testing.assert_array_equal(engine.run({"x": x})["output"], x)
    slots = max_in_flight + 1  # the batch awaited and the ones dispatched ahead of it
    threads = [thread_of[k] for k in range(20)]
    assert len(set(threads)) == slots
    for k in range(20 - slots + 1):
        assert len(set(threads[k:k + slots])) == slots, f"batches {k}..{k + slots - 1} share a thread"


def test_out_of_memory_on_one_row_names_the_fix(model):
    fn, params = model
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8, clock=OutOfMemoryWhileRunning(max_rows=0))
    with pytest.raises(RuntimeError, match="out of device memory on a 1 x 1 batch .* a single row does not fit"):
        engine.run(images(3))


@pytest.mark.parametrize("inputs, bucketing, message", [
    ({"mask": ((None,), "int32")}, Bucketing(), "'mask' is reserved"),
    ({"x": ((None, None), "float32")}, Bucketing(), "has 2 variable axes"),
    ({"x": ((0,), "float32")}, ROWS8, r"shape \(0,\) must hold positive sizes"),
    ({"x": ((3,), "floaty")}, ROWS8, "dtype 'floaty' is not a numpy dtype name"),
    ({"x": ((3,), "float32")}, Bucketing(), r"planned by rows alone.*Bucketing.for_rows"),
    ({}, ROWS8, "inputs is empty"),
])
def test_bad_declarations_name_the_input_and_the_fix(inputs, bucketing, message):
    with pytest.raises(ValueError, match=message):
        Engine(lambda p, b: b, None, inputs=inputs, bucketing=bucketing)


def test_unknown_pad_values_are_refused():
    with pytest.raises(ValueError, match=r"pad_values names \['y'\], which are not inputs"):
        Engine(lambda p, b: b, None, inputs={"x": ((3,), "float32")}, pad_values={"y": 1}, bucketing=ROWS8)


def test_bad_rows_are_errors_that_name_the_row_and_input(model):
    fn, params = model
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8)
    good = images(4)
    cases = [
        ({"pixels": good["pixels"]}, r"missing \['scale'\]"),
        ({**good, "extra": good["scale"]}, r"unexpected \['extra'\]"),
        ({**good, "scale": good["scale"][:3]}, "different row counts"),
        ({**good, "pixels": good["pixels"].reshape(4, 2, 8)}, r"input 'pixels' has shape \(4, 2, 8\)"),
        ({**good, "pixels": list(good["pixels"][:2]) + [np.zeros((4, 3))] + [good["pixels"][3]]},
         r"row 2: input 'pixels' has shape \(4, 3\); expected \(4, 4\)"),
        ({**good, "pixels": good["pixels"].astype(np.complex64)}, "dtype complex64, which does not cast"),
        ({"pixels": good["pixels"][:0], "scale": good["scale"][:0]}, "no rows to run"),
        ({**good, "scale": np.float32(1)}, "input 'scale' is a float32, not rows"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.run(inputs)
    variable = Engine(masked_stats, np.float32(1), inputs=VARIABLE, bucketing=Bucketing(lengths=(4, 8), token_budget=16))
    rows = variable_rows(3)
    cases = [
        ({**rows, "ids": rows["ids"][:1] + [np.ones(99, np.int32)] + rows["ids"][2:]},
         r"row 1: input 'ids' has length 99 on its variable axis but 'frames' has \d"),
        ({**rows, "frames": rows["frames"][:2] + [np.ones((2, 3), np.float32)]},
         r"row 2: input 'frames' has shape \(2, 3\); expected \(3, None\)"),
        ({**rows, "ids": rows["ids"][:2] + [rows["ids"][2].astype(np.float32)]}, "row 2: input 'ids' has dtype float32"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            variable.run(inputs)
    assert engine.stats.compiles == 0 and variable.stats.compiles == 0


def test_outputs_that_are_not_per_row_are_refused_at_compile():
    def total(params, batch):
        return batch["x"].sum()  # a scalar, not [B, ...]

    def per_length(params, batch):
        return batch["x"] * batch["mask"]  # [B, L]: depends on the bucket length

    with pytest.raises(ValueError, match=r"output 'output' has shape \(\) for a batch of 8 rows"):
        Engine(total, None, inputs={"x": ((3,), "float32")}, bucketing=ROWS8).warmup()
    with pytest.raises(ValueError, match=r"output 'output' has shape \(\) for a batch of 1 rows"):
        Engine(total, None, inputs={"x": ((3,), "float32")}, bucketing=ROWS8).output_spec()
    engine = Engine(per_length, None, inputs={"x": ((None,), "float32")},
                    bucketing=Bucketing(lengths=(2, 4), token_budget=8, ladder=0))
    with pytest.raises(ValueError, match="must not depend on the bucket length"):
        engine.warmup()


@pytest.mark.parametrize("max_in_flight", [0, 2])
def test_batches_in_flight_run_at_once_and_zero_runs_one_at_a_time(max_in_flight):
    """Each batch in flight has its own dispatch thread, so (on the CPU too) they compute at the same
    time; a host callback that sleeps 50 ms inside each batch counts how many overlap."""
    lock, running = threading.Lock(), {"now": 0, "peak": 0}

    def slow_identity(x):
        with lock:
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        return x

    def fn(params, batch):  # [B, 2] float32 -> [B, 2] float32
        x = jax.pure_callback(slow_identity, jax.ShapeDtypeStruct(batch["x"].shape, jnp.float32), batch["x"])
        return x * params["w"]

    engine = Engine(fn, {"w": np.float32(3.0)}, inputs={"x": ((2,), "float32")},
                    bucketing=Bucketing.for_rows(batch_size=4, ladder=0), max_in_flight=max_in_flight)
    x = np.arange(48, dtype=np.float32).reshape(24, 2)  # 6 batches of 4 rows
    np.testing.assert_array_equal(engine.run({"x": x})["output"], 3 * x)
    assert running["peak"] == max_in_flight + 1


def test_a_negative_max_in_flight_is_refused(model):
    fn, params = model
    with pytest.raises(ValueError, match="max_in_flight must be >= 0, got -1"):
        Engine(fn, params, inputs=PIXELS, bucketing=ROWS8, max_in_flight=-1)


def test_on_rows_hears_each_batch_as_it_completes_on_the_calling_thread(model):
    fn, params = model
    engine = Engine(fn, params, inputs=PIXELS, bucketing=ROWS8)
    heard = []
    stats = EngineStats(on_rows=lambda n: heard.append((n, threading.current_thread())))
    out = engine.run(images(29), stats=stats)
    assert sum(n for n, _ in heard) == 29 and len(heard) == stats.batches >= 4  # batches of at most 8 rows
    assert max(n for n, _ in heard) == 8
    assert {t for _, t in heard} == {threading.current_thread()}
    assert len(out["label"]) == 29 and stats.rows == 29
    total = EngineStats()
    total.add(stats)  # a hook is not a count: adding stats leaves it out
    assert total.on_rows is None and total.rows == 29
