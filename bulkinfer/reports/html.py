"""A tiny self-contained HTML report: a title, headings, paragraphs, tables and matplotlib figures.

    >>> report = Report("Evaluation of digits")
    >>> report.heading("Headline metrics")
    >>> report.table([["accuracy", 0.97], ["log_loss", 0.11]], header=["metric", "value"])
    >>> fig = figure(width=4, height=3); ax = fig.add_subplot(); ax.plot([0, 1], [0, 1])
    >>> report.figure(fig, "reliability", caption="Reliability diagram")
    >>> report.write("out/eval")        # out/eval/report.html and out/eval/reliability.png

The page needs nothing but a browser: no CDN, no JavaScript, no stylesheet outside it.  Each figure is
saved as a PNG beside the HTML and also inlined as a base64 `data:` image, so the HTML alone is enough
(mail it, open it offline).  Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`,
rendered by Agg) and never touch pyplot's global state, so reports can be made from any thread.
Files go through Beam's FileSystems, so DIR may be on any Beam filesystem.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from typing import Any

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.6em 1em 0.6em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
p.note { color: #555; font-size: 0.9em; }
"""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def figure(*, width: float = 5.0, height: float = 4.0, dpi: int = 100):
    """A new matplotlib Figure (object API, Agg rendering; pyplot is never imported), width and height in inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to `digits` significant decimals, None as an em dash, others as str."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


class Report:
    """An HTML page built in order: `heading`, `paragraph`, `table`, `figure`; then `write(directory)`.

    title: the page's <title> and <h1>.  Every text is HTML-escaped.
    """

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []
        self._pngs: dict[str, bytes] = {}  # file name -> PNG bytes, saved beside the HTML

    def heading(self, text: str, level: int = 2) -> None:
        """An <h2> (or <h3>, ... for level 3..6)."""
        if not 2 <= level <= 6:
            raise ValueError(f"heading level {level} is not 2..6 (the title is the page's only <h1>)")
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, *, note: bool = False) -> None:
        """A paragraph of plain text (note=True: smaller and grey, for explanations)."""
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, rows: Sequence[Sequence[Any]], *, header: Sequence[str] | None = None, digits: int = 4) -> None:
        """A table of `rows` (each a sequence of cells; floats shown with `digits` decimals)."""
        out = ["<table>"]
        if header is not None:
            out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{html.escape(format_value(c, digits))}</td>" for c in row) + "</tr>")
        out.append("</table>")
        self._parts.append("\n".join(out))

    def figure(self, fig, name: str, *, caption: str = "") -> None:
        """Renders matplotlib Figure `fig` to PNG, saved as `name`.png beside the HTML and inlined.

        name: a file name stem of letters, digits, '_', '-', '.' (unique within the report).
        Raises ValueError for another name or one used twice.
        """
        if not _NAME.match(name):
            raise ValueError(f"figure name {name!r} must be letters, digits, '_', '-' or '.', e.g. 'confusion_matrix'")
        file = f"{name}.png"
        if file in self._pngs:
            raise ValueError(f"figure name {name!r} is used twice in this report; give each figure its own name")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self._pngs[file] = buf.getvalue()
        data = base64.b64encode(self._pngs[file]).decode("ascii")
        alt = html.escape(caption or name)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{cap}</figure>')

    @property
    def figures(self) -> list[str]:
        """The PNG file names, in order."""
        return list(self._pngs)

    def html(self) -> str:
        """The whole page as one string."""
        title = html.escape(self.title)
        body = "\n".join(self._parts)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
                f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n")

    def write(self, directory: str, name: str = "report.html") -> str:
        """Writes the PNGs and then the HTML (under temporary names, renamed) into `directory`; returns the HTML's path."""
        from apache_beam.io.filesystems import FileSystems

        from bulkinfer.beam import writers

        writers.ensure_dir(directory)
        for file, png in self._pngs.items():
            _write(FileSystems.join(directory, file), png)
        path = FileSystems.join(directory, name)
        _write(path, self.html().encode("utf-8"))
        return path


def _write(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    from bulkinfer.beam import writers

    tmp = writers.temp_name(path)
    with FileSystems.create(tmp) as f:
        f.write(data)
    writers.commit(tmp, path)
