import gc
import time
import weakref

import jax.numpy as jnp

from bulkinfer.runtime.busy import BusyClock


def _until(condition, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_an_idle_watcher_ends_so_dropped_clocks_are_collected():
    clocks = [BusyClock(idle_exit_s=0.05) for _ in range(20)]
    for clock in clocks:
        ticket = clock.track(jnp.ones(3) * 2)
        ticket.wait()
        assert ticket.error is None and float(ticket.output.sum()) == 6.0
    refs = [weakref.ref(c) for c in clocks]
    del clocks, clock
    # A watcher holds its clock: the clocks can go only once their watchers ended.
    assert _until(lambda: gc.collect() >= 0 and all(r() is None for r in refs))


def test_a_clock_whose_watcher_ended_starts_another_and_times_every_output():
    clock = BusyClock(idle_exit_s=0.02)
    for round_ in range(3):
        tickets = [clock.track(jnp.arange(4) + k) for k in range(5)]
        for k, ticket in enumerate(tickets):
            ticket.wait()
            assert int(ticket.output[0]) == k and ticket.busy_s >= 0.0
        assert _until(lambda: clock._thread is None), f"round {round_}: the idle watcher did not end"
