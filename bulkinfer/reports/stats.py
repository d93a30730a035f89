"""The `bulkinfer stats` report: DIR/report.html with its figures (also DIR/*.png), from stats.json.

    >>> write_report("out/", json.load(open("out/stats.json")))          # -> "out/report.html"

Figures: the predicted-class distribution and the confidence histogram of a classifier, the norm
histogram of an embedder (each beside the baseline's when there is one), and the drift per distribution.
Tables: the headline numbers, rows per slice, and the drift per slice.
"""

from __future__ import annotations

import math

import numpy as np

from bulkinfer.reports.html import Report, figure

CURRENT, BASELINE = "#1f77b4", "#ff7f0e"


def write_report(directory: str, result: dict, baseline: dict | None = None) -> str:
    """Writes DIR/report.html (and the PNGs) for a stats.json content `result` and, optionally, the
    baseline's stats.json content; returns the HTML's path."""
    report = Report(f"Prediction statistics: {result.get('model', 'model')}")
    report.paragraph(f"Input {result.get('input')}: {result['rows_in']} rows in, {result['rows_out']} predicted, "
                     f"{result['rows_failed']} failed (dead letters in {result.get('predictions')}).")
    sketch = result["sketch"]
    report.paragraph(f"Quantiles from {sketch['library']} with k={sketch['k']}: normalized rank error "
                     f"{sketch['normalized_rank_error']:.4f} (99% confidence). Counts, histograms, means and "
                     "variances are exact and do not depend on how the job was sharded.", note=True)
    overall = result["overall"]
    base = (baseline or {}).get("overall", {})
    if overall.get("classifier"):
        _classifier(report, overall["classifier"], base.get("classifier"))
    if overall.get("embedder"):
        _embedder(report, overall["embedder"], base.get("embedder"))
    if overall["rows"] == 0:
        report.paragraph("No prediction rows: every input row failed or the input is empty.")
    if result.get("slices"):
        _slices(report, result["slices"])
    if "drift" in result:
        _drift(report, result["drift"])
    return report.write(directory)


def _classifier(report: Report, c: dict, base: dict | None) -> None:
    report.heading("Classifier outputs")
    rows = [[name, s["mean"], s["std"], *s["quantiles"].values()]
            for name, s in (("confidence", c["confidence"]), ("margin", c["margin"]),
                            ("entropy (bits)", c["entropy_bits"]))]
    report.table(rows, header=["", "mean", "std", *[f"q{r}" for r in c["confidence"]["quantiles"]]])
    if c["rows_nonfinite"]:
        report.paragraph(f"{c['rows_nonfinite']} rows with non-finite probabilities are left out.", note=True)
    fig = figure(width=6, height=3.6)
    ax = fig.add_subplot()
    classes = np.arange(c["num_classes"])
    width = 0.4 if base else 0.8
    ax.bar(classes - (width / 2 if base else 0), _fractions(c["class_counts"]), width, color=CURRENT,
           label="this run")
    if base and base["num_classes"] == c["num_classes"]:
        ax.bar(classes + width / 2, _fractions(base["class_counts"]), width, color=BASELINE, label="baseline")
        ax.legend()
    ax.set_xticks(classes)
    ax.set_xlabel("predicted class (argmax)")
    ax.set_ylabel("fraction of rows")
    ax.set_title("Predicted-class distribution")
    report.figure(fig, "class_distribution", caption="Predicted-class distribution (fraction of rows per class)")
    fig = _histogram_figure(c["confidence"]["histogram"], base and base["confidence"]["histogram"],
                            "confidence (top probability)", "Confidence histogram")
    report.figure(fig, "confidence_histogram", caption="Confidence histogram (fraction of rows per bin)")


def _embedder(report: Report, e: dict, base: dict | None) -> None:
    report.heading("Embeddings")
    s = e["norm"]
    report.table([["L2 norm", s["mean"], s["std"], *s["quantiles"].values()]],
                 header=["", "mean", "std", *[f"q{r}" for r in s["quantiles"]]])
    cos = e["cosine_sample"]
    report.table([["dimensions", e["dim"]], ["rows", e["rows"]], ["norm of the mean vector", e["mean_vector_norm"]],
                  ["total variance (sum over dimensions)", e["total_variance"]],
                  ["mean pairwise cosine", cos["mean_pairwise_cosine"]],
                  ["cosine sample (rows, pairs)", f"{cos['size']} rows, {cos['pairs']} pairs"]])
    report.paragraph(f"Cosine sample: {cos['method']}.", note=True)
    fig = _histogram_figure(s["histogram"], base and base["norm"]["histogram"], "L2 norm", "Norm histogram",
                            log_x=True)
    report.figure(fig, "norm_histogram", caption="Embedding norm histogram (fraction of rows per bin)")


def _slices(report: Report, slices: dict) -> None:
    report.heading("Slices")
    groups = [(field, value, g) for field, values in slices.items() for value, g in values.items()]
    classifier = any(g.get("classifier") for _, _, g in groups)
    embedder = any(g.get("embedder") for _, _, g in groups)
    header = ["field", "value", "rows"]
    header += ["median confidence", "mean entropy (bits)"] if classifier else []
    header += ["median norm", "mean pairwise cosine"] if embedder else []
    rows = []
    for field, value, g in groups:
        c, e = g.get("classifier"), g.get("embedder")
        row = [field, value, g["rows"]]
        if classifier:
            row += [c and c["confidence"]["quantiles"].get("0.5"), c and c["entropy_bits"]["mean"]]
        if embedder:
            row += [e and e["norm"]["quantiles"].get("0.5"), e and e["cosine_sample"]["mean_pairwise_cosine"]]
        rows.append(row)
    report.table(rows, header=header)


def _drift(report: Report, drift: dict) -> None:
    report.heading("Drift against the baseline")
    report.paragraph(f"Baseline {drift['baseline']}. {drift['metric']}.", note=True)
    overall = drift["overall"]
    if overall:
        fig = figure(width=6, height=0.6 + 0.5 * len(overall))
        ax = fig.add_subplot()
        names = list(overall)
        ax.barh(np.arange(len(names)), [overall[n] for n in names], color=CURRENT)
        ax.set_yticks(np.arange(len(names)), labels=names)
        ax.invert_yaxis()
        ax.set_xlim(0, max(0.05, *overall.values()) * 1.15)
        ax.set_xlabel("Jensen-Shannon distance (base 2)")
        ax.set_title("Drift per distribution")
        report.figure(fig, "drift", caption="Drift per distribution (0 = same, 1 = disjoint)")
    rows = [["overall", name, d] for name, d in overall.items()]
    for field, values in drift.get("slices", {}).items():
        rows += [[f"{field}={value}", name, d] for value, distances in values.items() for name, d in distances.items()]
    report.table(rows, header=["group", "distribution", "JS distance"])
    for line in drift.get("skipped", []):
        report.paragraph(f"Not compared: {line}.", note=True)


def _fractions(counts) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return counts / counts.sum() if counts.sum() else counts


def _histogram_figure(hist: dict, base: dict | None, xlabel: str, title: str, *, log_x: bool = False):
    """Step plot of a stats.json histogram (and the baseline's, when it has the same edges) as fractions of rows."""
    edges = np.array([float(e) for e in hist["edges"]])
    counts = np.asarray(hist["counts"], np.float64)
    series = [(counts, CURRENT, "this run")]
    if base and base["edges"] == hist["edges"]:
        series.append((np.asarray(base["counts"], np.float64), BASELINE, "baseline"))
    used = np.flatnonzero(sum(c for c, _, _ in series))
    lo, hi = (used[0], used[-1] + 1) if used.size else (0, len(counts))
    if log_x:  # the first and last norm bins reach 0 and +inf: show the used finite range, widened a bin
        lo, hi = max(lo - 1, 1), min(hi + 1, len(counts) - 1)
        if hi <= lo:
            lo, hi = 1, len(counts) - 1
    fig = figure(width=6, height=3.6)
    ax = fig.add_subplot()
    for c, color, label in series:
        total = c.sum()
        frac = c / total if total else c
        ax.stairs(frac[lo:hi], edges[lo:hi + 1], color=color, label=label, fill=label == "this run",
                  alpha=0.6 if label == "this run" else 1.0, linewidth=1.5)
    if log_x and all(math.isfinite(e) and e > 0 for e in edges[lo:hi + 1]):
        ax.set_xscale("log")
    if len(series) > 1:
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of rows")
    ax.set_title(title)
    return fig
