import logging

from bulkinfer.errors import BadSettings
from bulkinfer.tasks.beam_log import BEAM_LOGGERS, quiet_own_errors


def _log_failures(logger: logging.Logger) -> None:
    for error in (BadSettings("bad flag"), KeyError("a bug")):
        try:
            raise error
        except Exception:
            logger.exception("bundle failed: %s", type(error).__name__)


def test_beams_record_of_our_own_error_is_dropped_unless_the_user_asked_for_info(caplog):
    beam_log = logging.getLogger(BEAM_LOGGERS[0])
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.WARNING)  # the CLI without -v
        with caplog.at_level(logging.WARNING, logger=BEAM_LOGGERS[0]), quiet_own_errors((BadSettings,)):
            _log_failures(beam_log)
        assert [r.getMessage() for r in caplog.records] == ["bundle failed: KeyError"]
        caplog.clear()
        root.setLevel(logging.INFO)  # bulkinfer -v: every traceback stays
        with caplog.at_level(logging.INFO, logger=BEAM_LOGGERS[0]), quiet_own_errors((BadSettings,)):
            _log_failures(beam_log)
        assert [r.getMessage() for r in caplog.records] == ["bundle failed: BadSettings", "bundle failed: KeyError"]
    finally:
        root.setLevel(level)
    assert not beam_log.filters
