"""The shared HTML report writer: escaped text, tables, figures saved as PNG and inlined, rendered by Chromium."""

import base64
import os
import re

import pytest

from bulkinfer.reports.html import Report, figure, format_value
from bulkinfer.testing import CHROMIUM, render_html

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)")


def _report() -> Report:
    report = Report("Scores <&> more")
    report.heading("Numbers")
    report.paragraph("a < b & c", note=True)
    report.table([["accuracy", 0.123456], ["missing", None]], header=["metric", "value"])
    fig = figure(width=3, height=2)
    fig.add_subplot().bar([0, 1, 2], [3, 1, 2])
    report.figure(fig, "bars", caption="Bars")
    return report


def test_text_is_escaped_and_figures_are_saved_and_inlined(tmp_path):
    path = _report().write(str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert path.endswith("report.html")
    assert "<title>Scores &lt;&amp;&gt; more</title>" in page and "a &lt; b &amp; c" in page
    assert "<td>0.1235</td>" in page and "<td>\u2014</td>" in page
    png = (tmp_path / "bars.png").read_bytes()
    [inline] = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(inline) == png and png.startswith(b"\x89PNG")
    assert "http" not in page and "<script" not in page  # nothing fetched, nothing run
    assert not list(tmp_path.glob(".tmp-*"))


def test_bad_figure_names_and_headings_are_refused():
    report = Report("r")
    fig = figure()
    with pytest.raises(ValueError, match="figure name '../x'"):
        report.figure(fig, "../x")
    report.figure(fig, "x")
    with pytest.raises(ValueError, match="used twice"):
        report.figure(fig, "x")
    with pytest.raises(ValueError, match="heading level 1"):
        report.heading("t", level=1)
    assert format_value(float("nan")) == "nan" and format_value(3) == "3" and format_value(1.5, 2) == "1.50"


@needs_chromium
def test_chromium_renders_every_figure_and_notices_a_broken_one(tmp_path):
    path = _report().write(str(tmp_path))
    result = render_html(path)
    assert result["title"] == "Scores <&> more" and result["tables"] == 1
    [image] = result["images"]
    assert image["complete"] and (image["naturalWidth"], image["naturalHeight"]) == (300, 200)
    broken = tmp_path / "broken.html"
    broken.write_text((tmp_path / "report.html").read_text().replace("base64,iVBOR", "base64,AAAA"))
    [image] = render_html(broken)["images"]
    assert image["naturalWidth"] == 0  # a figure that did not decode is noticed
