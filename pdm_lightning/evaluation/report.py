"""Evaluation outputs: metrics JSON and CSV, the multi-subject table and bar plot (grids: ``generation.files.make_grid``)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.generation.files import save_png_with_metadata

# Report order and display names (docs/method.md).
METRIC_NAMES = {
    "dino_i": "DINO-I", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_d": "DINO-D", "clip_d": "CLIP-D",
    "lpips_i": "LPIPS-I", "lpips_d": "LPIPS-D", "pres": "PRES",
}
# Which way is better, for each metric (docs/method.md's table): the plot's titles and the table's arrows.
METRIC_DIRECTIONS = {
    "dino_i": "higher", "clip_i": "higher", "clip_t": "higher", "dino_d": "lower", "clip_d": "lower",
    "lpips_i": "lower", "lpips_d": "higher", "pres": "lower",
}
DIRECTION_ARROWS = {"higher": "↑", "lower": "↓"}


def present_metrics(metrics: Mapping[str, float | None]) -> dict[str, float]:
    """The metrics that were computed, in report order (a left-out metric is absent, never 0)."""
    return {name: float(metrics[name]) for name in METRIC_NAMES if metrics.get(name) is not None}


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_report(path: Path, report: Mapping[str, Any]) -> None:
    write_text_atomically(path, json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_csv_report(path: Path, per_prompt: Sequence[Mapping[str, Any]], overall: Mapping[str, float | None]) -> None:
    """One row per prompt (its metrics) and a last row ``all`` with the subject's metrics."""
    columns = [name for name in METRIC_NAMES if overall.get(name) is not None or any(row.get(name) is not None for row in per_prompt)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["prompt", *columns])
    for row in [*per_prompt, {"prompt": "all", **overall}]:
        writer.writerow([row["prompt"], *(_cell(row.get(name)) for name in columns)])
    write_text_atomically(path, buffer.getvalue())


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def save_png(image: Image.Image, path: Path, metadata: Mapping[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_with_metadata(image, path, metadata or {})


# ---- the multi-subject table -------------------------------------------------------------------


def subject_table(results: Mapping[str, Mapping[str, float | None]]) -> tuple[list[str], list[list[str | float | None]]]:
    """Header and rows (subject x metric, then ``mean`` over the subjects that have each metric)."""
    columns = [name for name in METRIC_NAMES if any(r.get(name) is not None for r in results.values())]
    rows: list[list[str | float | None]] = [[subject, *(metrics.get(c) for c in columns)] for subject, metrics in results.items()]
    means = []
    for c in columns:
        values = [m[c] for m in results.values() if m.get(c) is not None]
        means.append(sum(values) / len(values) if values else None)
    rows.append(["mean", *means])
    return ["subject", *columns], rows


def write_subject_table(out_dir: Path, results: Mapping[str, Mapping[str, float | None]], stem: str = "results") -> list[Path]:
    """``results.csv``, ``results.md`` and ``results.png`` (bar plot) in ``out_dir``."""
    header, rows = subject_table(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[row[0], *(_cell(v) for v in row[1:])] for row in rows])
    csv_path, md_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    write_text_atomically(csv_path, buffer.getvalue())
    write_text_atomically(md_path, markdown_table(header[1:], rows))
    directions = {METRIC_NAMES[c]: f"{METRIC_DIRECTIONS[c]} is better" for c in header[1:]}
    save_png(bar_plot(header[1:], rows), png_path, {"Title": "metrics per subject", "directions": json.dumps(directions)})
    return [csv_path, md_path, png_path]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table in Markdown: each metric's header with its direction arrow, explained below the table."""
    names = ["subject", *(f"{METRIC_NAMES[c]} {DIRECTION_ARROWS[METRIC_DIRECTIONS[c]]}" for c in columns)]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        label = f"**{row[0]}**" if row[0] == "mean" else str(row[0])
        lines.append("| " + " | ".join([label, *("-" if v is None else f"{v:.4f}" for v in row[1:])]) + " |")
    lines += ["", "↑ higher is better, ↓ lower is better (docs/method.md describes each metric)."]
    return "\n".join(lines) + "\n"


PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
MEAN_COLOUR = "#333333"  # the mean's bar; pure black is the zero line


@dataclass(frozen=True)
class Axis:
    """A panel's value range and tick step (multiples of the step, always including 0)."""

    low: float
    high: float
    step: float

    def ticks(self) -> list[float]:
        # Integer multiples of the step: the zero tick is exactly 0, not 1e-17 after adding steps.
        first, last = round(self.low / self.step), round(self.high / self.step)
        return [k * self.step for k in range(first, last + 1)]


def nice_axis(values: Sequence[float], max_ticks: int = 6) -> Axis:
    """The smallest range of round ticks (1, 2, 2.5 or 5 x 10^k apart) that holds 0 and every value.

    Cosine similarities run from -1 to 1 (CLIP-T of an untrained model can be below 0) and LPIPS from 0
    to about 1: a fixed [0, 1] scale would hide negative values and flatten small ones.
    """
    low, high = min(0.0, *values), max(0.0, *values)
    if high - low < 1e-9:
        high = low + 1.0
    for exponent in range(-6, 7):
        for mantissa in (1.0, 2.0, 2.5, 5.0):
            step = mantissa * 10.0 ** exponent
            axis = Axis(math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step, step)
            if len(axis.ticks()) <= max_ticks:
                return axis
    return Axis(low, high, high - low)


def bar_plot(columns: Sequence[str], rows: Sequence[Sequence[Any]], bar_height: int = 14, panel_width: int = 420) -> Image.Image:
    """One panel per metric (titled with its direction), one horizontal bar per subject (the mean last,
    in dark grey), each value written at its bar's end.

    Each panel has its own axis (ticks, grid and a black zero line): a negative value's bar goes left
    of the zero line; a metric a subject lacks is shown as "-".
    """
    font = ImageFont.load_default()
    label_width, value_room, margin, title_height, axis_height = 110, 44, 10, 20, 18
    bars_height = len(rows) * (bar_height + 4)
    panel_height = title_height + bars_height + axis_height + margin
    per_row = min(len(columns), 3)
    panels_down = math.ceil(len(columns) / per_row)
    canvas = Image.new("RGB", (per_row * (panel_width + margin) + margin, panels_down * (panel_height + margin) + margin), "white")
    draw = ImageDraw.Draw(canvas)
    for m, column in enumerate(columns):
        x0 = margin + (m % per_row) * (panel_width + margin)
        y0 = margin + (m // per_row) * (panel_height + margin)
        draw.rectangle([x0, y0, x0 + panel_width, y0 + panel_height], outline="#BBBBBB")
        draw.text((x0 + 6, y0 + 4), metric_title(column), fill="black", font=font)
        values = [row[1 + m] for row in rows]
        axis = nice_axis([v for v in values if v is not None])
        left, right = x0 + label_width + value_room, x0 + panel_width - value_room
        top, bottom = y0 + title_height, y0 + title_height + bars_height

        def x_of(value: float, axis: Axis = axis, left: int = left, right: int = right) -> int:
            return round(left + (value - axis.low) / (axis.high - axis.low) * (right - left))

        for tick in axis.ticks():
            x = x_of(tick)
            draw.line([x, top, x, bottom], fill="#E4E4E4")
            draw.line([x, bottom, x, bottom + 3], fill="#555555")
            label = f"{tick:.3g}"
            draw.text((x - draw.textlength(label, font=font) / 2, bottom + 4), label, fill="#555555", font=font)
        draw.line([left, bottom, right, bottom], fill="#555555")
        zero = x_of(0.0)
        for r, (row, value) in enumerate(zip(rows, values)):
            y = top + r * (bar_height + 4) + 2
            draw.text((x0 + 6, y + 1), str(row[0])[:16], fill="black", font=font)
            if value is None:
                draw.text((zero + 4, y + 1), "-", fill="black", font=font)
                continue
            end = x_of(value)
            colour = MEAN_COLOUR if row[0] == "mean" else PALETTE[r % len(PALETTE)]
            if end != zero:
                draw.rectangle([min(zero, end), y, max(zero, end), y + bar_height], fill=colour)
            text = f"{value:.3f}"
            text_x = end + 4 if value >= 0 else end - 4 - draw.textlength(text, font=font)
            draw.text((text_x, y + 1), text, fill="black", font=font)
        draw.line([zero, top, zero, bottom], fill="black")  # on top of the bars' edges
    return canvas


def metric_title(column: str) -> str:
    """``DINO-I (higher is better)``: the display name and which way is better."""
    name = METRIC_NAMES.get(column, column)
    return f"{name} ({METRIC_DIRECTIONS[column]} is better)" if column in METRIC_DIRECTIONS else name
