"""The eval report, DIR/report.html: headline metrics (with intervals and the baseline gate), a
confusion matrix, a reliability diagram, a confidence histogram, per-class bars, and per-slice tables.

    >>> write_report(json.load(open("out/eval/metrics.json")), "out/eval")   # report.html + 4 PNGs
"""

from __future__ import annotations

import numpy as np

from bulkinfer.reports.html import Report, figure

FIGURES = ("confusion_matrix", "reliability", "confidence_histogram", "per_class")


def _class_labels(metrics: dict) -> list[str]:
    names = metrics.get("class_names")
    return list(names) if names else [str(i) for i in range(metrics["num_classes"])]


def write_report(metrics: dict, directory: str) -> str:
    """Writes report.html and the FIGURES as PNGs into `directory` from an eval's metrics.json dict;
    returns the HTML's path."""
    report = Report(f"Evaluation of {metrics.get('model', 'a model')}")
    report.paragraph(f"{metrics['rows_in']} rows in; {metrics['rows_out']} predicted, {metrics['rows_failed']} "
                     f"failed in prediction; {metrics['rows_evaluated']} evaluated, {metrics['rows_failed_eval']} "
                     f"set aside by the evaluation (failed-eval-*.jsonl).  True class: field "
                     f"'{metrics['label_field']}'.")
    report.heading("Headline metrics")
    intervals = metrics.get("bootstrap", {}).get("intervals", {})
    gate = metrics.get("baseline", {}).get("metrics", {})
    header = ["metric", "value"]
    if intervals:
        p = metrics["bootstrap"]["percentiles"]
        header += [f"{p[0]:g}%", f"{p[1]:g}%"]
    if gate:
        header += ["baseline", "delta", "gate"]
    rows = []
    for name in ("accuracy", "macro_f1", "log_loss", "brier", "ece"):
        row = [name, metrics.get(name)]
        if intervals:
            row += list(intervals.get(name) or (None, None))
        if gate:
            g = gate.get(name)
            row += [g["baseline"], g["delta"], "FAILED" if g["failed"] else "ok"] if g else [None, None, None]
        rows.append(row)
    report.table(rows, header=header)
    if intervals:
        report.paragraph(f"Intervals: {metrics['bootstrap']['replicates']} replicates of a Poisson bootstrap seeded "
                         f"{metrics['bootstrap']['seed']} (weights from the row ids: the same for any sharding).",
                         note=True)
    if gate:
        b = metrics["baseline"]
        report.paragraph(f"Baseline {b['directory']}: {'passed' if b['passed'] else 'FAILED'} (max_drop "
                         f"{b['max_drop']}; a metric fails when even its interval's best end is worse than the "
                         "baseline by more than max_drop).", note=True)

    labels = _class_labels(metrics)
    cm = np.asarray(metrics["confusion_matrix"])
    report.heading("Confusion matrix")
    report.figure(_confusion(cm, labels), "confusion_matrix", caption="Confusion matrix (rows: true class)")
    report.heading("Calibration")
    cal = metrics["calibration"]
    report.figure(_reliability(cal), "reliability", caption=f"Reliability diagram (ECE {metrics['ece']:.4f})")
    report.figure(_confidence(cal), "confidence_histogram", caption="Top-label confidence histogram")
    report.heading("Per class")
    pc = metrics["per_class"]
    report.figure(_per_class(pc, labels), "per_class", caption="Precision, recall and F1 per class")
    report.table([[labels[i], pc["precision"][i], pc["recall"][i], pc["f1"][i], pc["support"][i]]
                  for i in range(len(labels))], header=["class", "precision", "recall", "f1", "support"])
    for field, values in (metrics.get("slices") or {}).items():
        report.heading(f"Slices by {field}")
        report.table([[value, m["rows"], m["accuracy"], m["macro_f1"], m["log_loss"], m["brier"], m["ece"]]
                      for value, m in values.items()],
                     header=[field, "rows", "accuracy", "macro_f1", "log_loss", "brier", "ece"])
    return report.write(directory)


def _confusion(cm: np.ndarray, labels: list[str]):
    c = len(labels)
    size = min(9.0, 3.0 + 0.45 * c)
    fig = figure(width=size, height=size * 0.85)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if c <= 30:
        ax.set_xticks(range(c), labels, rotation=90 if c > 10 or max(map(len, labels)) > 3 else 0)
        ax.set_yticks(range(c), labels)
    if c <= 20:
        top = cm.max() if cm.size else 0
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if top and cm[i, j] > top / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return fig


def _reliability(cal: dict):
    edges = np.asarray(cal["edges"])
    count = np.asarray(cal["count"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(count > 0, np.asarray(cal["correct"]) / count, np.nan)
        confidence = np.where(count > 0, np.asarray(cal["confidence_sum"]) / count, np.nan)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig = figure(width=4.8, height=4.8)
    ax = fig.add_subplot()
    ax.bar(centers, np.nan_to_num(accuracy), width=width * 0.95, color="#4c78a8", edgecolor="white",
           label="accuracy in bin")
    ax.plot(confidence, accuracy, "o", color="#e45756", markersize=4, label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    for x, n in zip(centers, count):
        if n:  # how many rows each bar stands on, at its foot
            ax.text(x, 0.01, f"{int(n)}", ha="center", va="bottom", fontsize=6, color="black",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("accuracy")
    fig.legend(loc="outside lower center", fontsize=8, ncols=2)
    return fig


def _confidence(cal: dict):
    edges = np.asarray(cal["edges"])
    count = np.asarray(cal["count"])
    fig = figure(width=4.8, height=4.2)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], count, width=np.diff(edges), align="edge", color="#72b7b2", edgecolor="white")
    for left, n in zip(edges[:-1], count):
        if n:
            ax.text(left + (edges[1] - edges[0]) / 2, n, f"{int(n)}", ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("rows")
    return fig


def _per_class(pc: dict, labels: list[str]):
    c = len(labels)
    x = np.arange(c)
    fig = figure(width=min(12.0, 3.0 + 0.5 * c), height=3.6)
    ax = fig.add_subplot()
    for k, (name, color) in enumerate((("precision", "#4c78a8"), ("recall", "#f58518"), ("f1", "#54a24b"))):
        ax.bar(x + (k - 1) * 0.27, pc[name], width=0.27, label=name, color=color)
    if c <= 40:
        ax.set_xticks(x, labels, rotation=90 if c > 10 or max(map(len, labels)) > 3 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    fig.legend(fontsize=8, ncols=3, loc="outside upper center")
    return fig
