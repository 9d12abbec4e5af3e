"""The PNG: one panel per scenario, a bar per path (median, whiskers min–max), burrow in orange."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import Figure, Scenario, fmt  # noqa: E402

COLORS = {"burrow": "#e4572e", "peer": "#4c72b0", "direct": "#9a9a9a"}
PASS_COLOR, FAIL_COLOR = "#1a7f37", "#cf222e"


def draw(path: Path, meta: dict[str, Any], scenarios: list[Scenario]) -> None:
    panels = [s for s in scenarios if s.chart and s.figures]
    if not panels:
        fig = plt.figure(figsize=(8, 2))
        fig.text(0.5, 0.5, "no scenario produced figures: see the Markdown table", ha="center")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(8.5 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, scenario in zip(axes.flat, panels, strict=False):
        _panel(ax, scenario)
    mode = "quick" if meta.get("quick") else "full"
    fig.suptitle(
        f"burrow vs direct, ssh -R and HAProxy — {meta['timestamp']} ({mode}, {meta['runs']} run(s), "
        f"{meta['machine']})\nbars: median; whiskers: min–max; orange: burrow, blue: peers, grey: direct",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _panel(ax: Any, scenario: Scenario) -> None:
    metrics = scenario.chart
    labels: list[str] = []
    rows: list[list[Figure | None]] = []
    for headline in scenario.figures:
        if headline.metric == metrics[0]:
            labels.append(headline.label)
            rows.append([scenario.get(headline.path, m) for m in metrics])
    height = 0.8 / len(metrics)
    first = rows[0][0] if rows else None
    unit = first.unit if first is not None else ""
    largest = max((f.max for row in rows for f in row if f is not None), default=1.0)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is None:
                continue
            figure = cell
            y = i + (j - (len(metrics) - 1) / 2) * height
            color = COLORS[figure.role]
            ax.barh(y, figure.median, height=height * 0.92, color=color, alpha=1.0 if j == 0 else 0.55)
            ax.errorbar(
                figure.median, y, xerr=[[figure.median - figure.min], [figure.max - figure.median]],
                fmt="none", ecolor="black", elinewidth=1, capsize=3,
            )  # fmt: skip
            text = f" {fmt(figure.median, figure.unit)}"
            if len(metrics) > 1:
                text += f" {figure.metric.split()[-1]}"
            if figure.ratio_best_peer is not None and figure.role == "burrow" and j == 0:
                text += f"  ({figure.ratio_best_peer:.2f}× best peer)"
            ax.text(figure.max if not scenario.log_scale else figure.max * 1.05, y, text, va="center", fontsize=8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    if scenario.log_scale:
        ax.set_xscale("log")
        ax.set_xlim(right=largest * 8)
    else:
        ax.set_xlim(0, largest * 1.45)
    ax.set_xlabel(f"{' / '.join(metrics)} ({unit})", fontsize=9)
    limit = scenario.extra.get("limit_line")
    if limit:
        ax.axvline(limit, color=FAIL_COLOR, linestyle="--", linewidth=1)
        ax.text(limit, len(labels) - 0.5, " limit", color=FAIL_COLOR, fontsize=8, va="bottom")
        ax.set_xlim(0, max(largest, limit) * 1.2)
    judged = [c.passed for c in scenario.checks if c.passed is not None]
    if not scenario.checks:
        status, color = "no target", "black"
    elif not judged:
        status, color = "target not judged", "black"
    elif all(judged):
        status, color = "target PASS", PASS_COLOR
    else:
        status, color = "target FAIL", FAIL_COLOR
    lines = [f"{scenario.id}. {scenario.title} — {status}"]
    for check in scenario.checks:
        mark = {True: "pass", False: "FAIL", None: "n/a"}[check.passed]
        lines.append(textwrap.fill(f"[{mark}] {check.text}: {check.measured}", 95, subsequent_indent="       "))
    ax.set_title("\n".join(lines), fontsize=9.5, color=color, loc="left")
    note = scenario.extra.get("annotation")
    if note:
        ax.text(0.98, 0.5, note, transform=ax.transAxes, ha="right", va="center", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#cccccc"})  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
