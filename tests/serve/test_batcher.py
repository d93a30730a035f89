import threading

import numpy as np
import pytest

from bulkinfer.serve.batcher import DynamicBatcher


def test_a_model_returning_the_wrong_row_count_fails_the_request_not_the_batcher():
    def predict(values):
        if "short" in values:
            return np.zeros((len(values) - 1, 2), np.float32)  # one row missing
        return np.ones((len(values), 2), np.float32)

    batcher = DynamicBatcher(predict, max_queue_delay_s=0)
    try:
        with pytest.raises(RuntimeError, match="returned 1 rows for 2 inputs"):
            batcher.submit(["short", "x"]).result(10)
        np.testing.assert_array_equal(batcher.submit(["a", "b", "c"]).result(10), np.ones((3, 2)))
    finally:
        batcher.close(10)


def test_a_model_returning_none_does_not_strand_later_requests():
    calls = []

    def predict(values):
        calls.append(list(values))
        return None if len(calls) == 1 else np.ones((len(values), 1))

    batcher = DynamicBatcher(predict, max_queue_delay_s=0)
    try:
        with pytest.raises(RuntimeError, match="returned NoneType rows"):
            batcher.submit(["a"]).result(10)
        assert batcher.submit(["b", "c"]).result(10).shape == (2, 1)
    finally:
        batcher.close(10)


def test_requests_queued_during_a_call_wait_for_the_window_after_it_so_answered_clients_can_join():
    now = [0.0]  # the batcher's clock
    running, gate = threading.Event(), threading.Event()
    calls = []

    def predict(values):
        calls.append(list(values))
        running.set()
        gate.wait(30)  # the first call runs until the test lets it end; later ones return at once
        return np.zeros((len(values), 1), np.float32)

    batcher = DynamicBatcher(predict, max_batch_rows=2, max_queue_delay_s=1000, clock=lambda: now[0])
    waiting = threading.Event()  # set when the batcher waits for more requests
    wait = batcher._cv.wait

    def spy(timeout=None):
        waiting.set()
        return wait(timeout)

    batcher._cv.wait = spy
    try:
        first = batcher.submit(["a1", "a2"])  # 2 rows = max_batch_rows: runs at once
        assert running.wait(30)
        queued = batcher.submit(["b"])  # arrives at 0 while the model runs
        now[0] = 5000.0  # the call ends long after b's own window (0 + 1000) has passed ...
        waiting.clear()
        gate.set()
        first.result(30)
        assert waiting.wait(30)  # ... yet b waits for the window that opens when the call ends,
        joined = batcher.submit(["c"])  # so a client the first call answered joins it in one call
        queued.result(30), joined.result(30)
        assert calls == [["a1", "a2"], ["b", "c"]]
    finally:
        gate.set()
        batcher.close(10)


@pytest.mark.parametrize("returns", [True, False])
def test_after_a_call_the_batcher_waits_for_the_sources_it_answered_unless_they_are_forgotten(returns):
    now = [0.0]  # the batcher's clock
    running, gate = threading.Event(), threading.Event()
    calls = []

    def predict(values):
        calls.append(list(values))
        if len(calls) == 1:
            running.set()
            now[0] += 100.0  # the first call lasts 100 s on the clock: the batcher waits up to 5 s after it
            gate.wait(30)
        return np.zeros((len(values), 1), np.float32)

    batcher = DynamicBatcher(predict, max_batch_rows=2, max_queue_delay_s=0, clock=lambda: now[0])
    waiting = threading.Event()
    wait = batcher._cv.wait

    def spy(timeout=None):
        waiting.set()
        return wait(timeout)

    batcher._cv.wait = spy
    try:
        first = batcher.submit(["a1", "a2"], source="A")  # 2 rows = max_batch_rows: runs at once
        assert running.wait(30)
        queued = batcher.submit(["c"], source="C")  # no queue delay, yet it does not run alone at once:
        waiting.clear()
        gate.set()
        first.result(30)
        assert waiting.wait(30)  # the batcher waits for A, which the first call answered
        if returns:
            batcher.submit(["a3"], source="A").result(30)  # A's next request joins C's
        else:
            batcher.forget("A")  # A's connection closed: C runs without it
        queued.result(30)
        assert calls == [["a1", "a2"], ["c", "a3"] if returns else ["c"]]
    finally:
        gate.set()
        batcher.close(10)


def test_a_source_forgotten_while_its_call_runs_is_not_waited_for_after_it():
    """A client that reads its answer and closes before the call's bookkeeping ends (forget comes first) must
    not hold the next group: on a clock that never moves, waiting for it would never end."""
    now = [0.0]
    running, gate = threading.Event(), threading.Event()
    calls = []

    def predict(values):
        calls.append(list(values))
        if len(calls) == 1:
            running.set()
            now[0] += 100.0
            gate.wait(30)
        return np.zeros((len(values), 1), np.float32)

    batcher = DynamicBatcher(predict, max_batch_rows=2, max_queue_delay_s=0, clock=lambda: now[0])
    try:
        first = batcher.submit(["a1", "a2"], source="A")
        assert running.wait(30)
        queued = batcher.submit(["c"], source="C")
        batcher.forget("A")  # A's connection closed while its call still ran
        gate.set()
        first.result(30)
        queued.result(10)
        assert calls == [["a1", "a2"], ["c"]]
    finally:
        gate.set()
        batcher.close(10)


def test_forgetting_sources_no_call_or_queue_names_keeps_nothing():
    """Health probes and metadata requests close their connections too: a server that answers only those
    must not keep each closed connection's handler until the next inference call."""
    batcher = DynamicBatcher(lambda values: np.zeros((len(values), 1), np.float32), max_batch_rows=2)
    try:
        for _ in range(1000):
            batcher.forget(object())
        assert batcher._gone == set()
    finally:
        batcher.close(10)
