import io

from bulkinfer.beam import progress


def test_progress_line_shows_rate_and_eta_when_total_is_known():
    with progress.Progress(total=1000, stream=io.StringIO()) as p:
        progress.advance(250)
        line = p.line()
    assert line.startswith("250/1,000 rows (25%)") and "rows/s" in line and "ETA" in line


def test_progress_line_without_total_has_no_eta():
    with progress.Progress(total=None, stream=io.StringIO()) as p:
        progress.advance(7)
        line = p.line()
    assert line.startswith("7 rows") and "ETA" not in line
