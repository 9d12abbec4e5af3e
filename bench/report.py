"""Results: figures with their spread and ratios, target checks, and the three outputs
(JSON, a Markdown table, a PNG chart)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One number for one path, measured ``len(runs)`` times."""

    metric: str
    unit: str
    path: str  # key, e.g. "burrow-tls"
    label: str  # e.g. "burrow TLS URL"
    runs: list[float]
    better: str = "higher"  # or "lower"
    mode: str = "tcp"  # tcp | tls: ratios compare within a mode
    role: str = "burrow"  # burrow | peer | direct
    ratio_direct: float | None = None
    ratio_best_peer: float | None = None
    best_peer: str | None = None

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)


@dataclass
class Check:
    """A target of the issue, judged on this run's numbers."""

    text: str
    measured: str
    passed: bool | None  # None: not judged (e.g. --quick runs a smaller scale)


@dataclass
class Scenario:
    id: str
    title: str
    description: str
    figures: list[Figure] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    chart: list[str] = field(default_factory=list)  # metrics to plot; the first is the headline
    log_scale: bool = False

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def get(self, path: str, metric: str) -> Figure | None:
        for figure in self.figures:
            if figure.path == path and figure.metric == metric:
                return figure
        return None

    def value(self, path: str, metric: str) -> float:
        figure = self.get(path, metric)
        if figure is None:
            raise KeyError(f"scenario {self.id}: no {metric} for {path}")
        return figure.median


def compute_ratios(scenario: Scenario) -> None:
    """Ratio of each median to direct's and to the best peer's, same metric and mode."""
    groups: dict[tuple[str, str], list[Figure]] = {}
    for figure in scenario.figures:
        groups.setdefault((figure.metric, figure.mode), []).append(figure)
    for group in groups.values():
        direct = next((f for f in group if f.role == "direct"), None)
        peers = [f for f in group if f.role == "peer"]
        best = None
        if peers:
            best = (max if group[0].better == "higher" else min)(peers, key=lambda f: f.median)
        for figure in group:
            if direct is not None and direct.median > 0:
                figure.ratio_direct = figure.median / direct.median
            if best is not None and best.median > 0:
                figure.ratio_best_peer = figure.median / best.median
                figure.best_peer = best.label


# ------------------------------------------------------------------ formatting

_DIGITS = {"Gbit/s": 2, "µs": 0, "ms": 2, "req/s": 0, "MiB": 1, "bytes": 0, "s": 2, "": 0, "%": 1, "×": 2}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    digits = _DIGITS.get(unit, 2)
    if unit == "ms" and abs(value) >= 100:
        digits = 0
    text = f"{value:,.{digits}f}"
    return text


def fmt_unit(value: float | None, unit: str) -> str:
    return f"{fmt(value, unit)} {unit}".strip()


def verdict(passed: bool | None) -> str:
    return {True: "**PASS**", False: "**FAIL**", None: "n/a"}[passed]


def markdown(results: dict[str, Any], scenarios: list[Scenario]) -> str:
    meta = results["meta"]
    out = [f"# burrow bench {meta['timestamp']}", ""]
    runs = f"{meta['runs']} run(s) per figure: median, min – max; {meta.get('seconds', '?')} s in all"
    out.append(f"`{meta['command']}` on {meta['machine']} ({runs})")
    out.append("")
    out.append("| # | target | measured | verdict |")
    out.append("|---|---|---|---|")
    for s in scenarios:
        for check in s.checks:
            out.append(f"| {s.id} | {check.text} | {check.measured} | {verdict(check.passed)} |")
    out.append("")
    for s in scenarios:
        out.append(f"## {s.id}. {s.title}")
        out.append("")
        out.append(s.description)
        out.append("")
        out.append("| path | metric | median | min – max | × direct | × best peer |")
        out.append("|---|---|---:|---:|---:|---:|")
        for f in s.figures:
            name = f"**{f.label}**" if f.role == "burrow" else f.label
            spread = f"{fmt(f.min, f.unit)} – {fmt(f.max, f.unit)}"
            out.append(
                f"| {name} | {f.metric} | {fmt_unit(f.median, f.unit)} | {spread} | {fmt(f.ratio_direct, '×')} "
                f"| {fmt(f.ratio_best_peer, '×')} |"
            )
        out.append("")
        for check in s.checks:
            out.append(f"- target: {check.text}: {check.measured} → {verdict(check.passed)}")
        for note in s.notes:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out)


def to_json(meta: dict[str, Any], scenarios: list[Scenario]) -> dict[str, Any]:
    data: dict[str, Any] = {"meta": meta, "scenarios": {}}
    for s in scenarios:
        entry = asdict(s)
        for fig, raw in zip(s.figures, entry["figures"], strict=True):
            raw.update(min=fig.min, median=fig.median, max=fig.max)
        data["scenarios"][s.id] = entry
    return data


def write(outdir: Path, stamp: str, meta: dict[str, Any], scenarios: list[Scenario]) -> dict[str, Path]:
    """Write ``<stamp>.json`` and ``<stamp>.md``; their paths (the chart is bench.chart's)."""
    outdir.mkdir(parents=True, exist_ok=True)
    for s in scenarios:
        compute_ratios(s)
    data = to_json(meta, scenarios)
    paths = {"json": outdir / f"{stamp}.json", "md": outdir / f"{stamp}.md"}
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown(data, scenarios) + "\n")
    return paths
