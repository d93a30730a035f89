import logging
import os
import signal

import apache_beam as beam
import pytest

from bulkinfer.tasks.beam_log import BEAM_LOGGERS
from bulkinfer.tasks.interrupt import interruptible


def test_ctrl_c_in_the_block_is_noted_raised_with_what_was_kept_and_beams_log_of_it_dropped(caplog):
    beam_log = logging.getLogger(BEAM_LOGGERS[0])
    with pytest.raises(KeyboardInterrupt, match="^3 units kept$") as raised:
        with caplog.at_level(logging.ERROR), interruptible(lambda: "3 units kept") as interrupt:
            beam_log.error("before the signal")
            try:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                except KeyboardInterrupt:  # Beam's embedded runner logs it and hands back a RuntimeError
                    beam_log.error("KeyboardInterrupt [while running 'Infer']")
                    raise RuntimeError("KeyboardInterrupt") from None
            except RuntimeError as e:  # what tasks.run does with it
                assert interrupt.requested
                raise KeyboardInterrupt from e
    assert isinstance(raised.value.__cause__.__cause__, RuntimeError)
    assert [r.getMessage() for r in caplog.records] == ["before the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert all(not logging.getLogger(name).filters for name in BEAM_LOGGERS)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        beam_log.error("after the block")
    assert [r.getMessage() for r in caplog.records] == ["after the block"]


def test_a_callers_own_sigint_handler_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with interruptible(lambda: "kept") as interrupt:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT] and not interrupt.requested
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_without_kept_text_passes_through_unchanged():
    with pytest.raises(KeyboardInterrupt) as raised:
        with interruptible():
            raise KeyboardInterrupt("as raised")
    assert str(raised.value) == "as raised"


def test_nested_blocks_both_note_the_signal_and_restore_each_others_handlers():
    with pytest.raises(KeyboardInterrupt, match="^outer kept$"):
        with interruptible(lambda: "outer kept") as outer:
            outer_handler = signal.getsignal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt, match="^inner kept$"):
                with interruptible(lambda: "inner kept") as inner:
                    os.kill(os.getpid(), signal.SIGINT)
            assert inner.requested and outer.requested
            assert signal.getsignal(signal.SIGINT) is outer_handler
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failure_is_an_interrupt_only_when_it_names_one_after_the_signal():
    from bulkinfer.tasks.interrupt import Interrupt, was_interrupted

    watch = Interrupt()
    wrapped = RuntimeError("KeyboardInterrupt [while running 'Infer']")
    assert not was_interrupted(watch, wrapped)  # no SIGINT noted
    watch.requested = True  # a SIGINT arrived, and perhaps was swallowed in a finalizer
    assert was_interrupted(watch, wrapped)
    assert not was_interrupted(watch, RuntimeError("disk full"))  # a genuine failure stays one
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ValueError("while stopping") from e
    except ValueError as chained:
        assert was_interrupted(watch, chained)


class _Fails(beam.DoFn):
    def process(self, x):
        raise ValueError(f"row {x} is bad")


def test_a_failing_pipeline_raises_what_failed_makes_of_it_and_no_interrupt():
    from bulkinfer.tasks.interrupt import run_interruptibly

    p = beam.Pipeline(runner="FnApiRunner")
    _ = p | beam.Create([1]) | beam.ParDo(_Fails())
    with pytest.raises(LookupError, match="^failed: .*row 1 is bad") as raised:
        run_interruptibly(p, kept=lambda: "kept", failed=lambda e: LookupError(f"failed: {e}"))
    assert "row 1 is bad" in str(raised.value.__cause__)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
