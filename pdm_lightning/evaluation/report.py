"""Evaluation outputs: metrics JSON and CSV, the multi-subject table and bar plot (grids: ``generation.files.make_grid``)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
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


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_with_metadata(image, path, {})


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
    names = ["subject", *(METRIC_NAMES[c] for c in header[1:])]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        label = f"**{row[0]}**" if row[0] == "mean" else str(row[0])
        lines.append("| " + " | ".join([label, *("-" if v is None else f"{v:.4f}" for v in row[1:])]) + " |")
    write_text_atomically(md_path, "\n".join(lines) + "\n")
    save_png(bar_plot(header[1:], rows), png_path)
    return [csv_path, md_path, png_path]


PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def bar_plot(columns: Sequence[str], rows: Sequence[Sequence[Any]], bar_height: int = 14, panel_width: int = 360) -> Image.Image:
    """One panel per metric, one horizontal bar per subject (the mean last, in black), value printed.

    Bars share the scale [0, 1] (every metric here is a cosine similarity or an LPIPS distance);
    a negative value draws no bar but keeps its printed number.
    """
    font = ImageFont.load_default()
    label_width, margin, title_height = 110, 10, 20
    panel_height = title_height + len(rows) * (bar_height + 4) + margin
    per_row = min(len(columns), 4)
    panels_down = math.ceil(len(columns) / per_row)
    canvas = Image.new("RGB", (per_row * (panel_width + margin) + margin, panels_down * (panel_height + margin) + margin), "white")
    draw = ImageDraw.Draw(canvas)
    bar_span = panel_width - label_width - 50
    for m, column in enumerate(columns):
        x0 = margin + (m % per_row) * (panel_width + margin)
        y0 = margin + (m // per_row) * (panel_height + margin)
        draw.rectangle([x0, y0, x0 + panel_width, y0 + panel_height], outline="#BBBBBB")
        draw.text((x0 + 6, y0 + 4), METRIC_NAMES.get(column, column), fill="black", font=font)
        for r, row in enumerate(rows):
            value = row[1 + m]
            y = y0 + title_height + r * (bar_height + 4)
            draw.text((x0 + 6, y + 1), str(row[0])[:16], fill="black", font=font)
            if value is None:
                draw.text((x0 + label_width, y + 1), "-", fill="black", font=font)
                continue
            length = int(round(bar_span * min(max(value, 0.0), 1.0)))
            colour = "black" if row[0] == "mean" else PALETTE[r % len(PALETTE)]
            if length > 0:
                draw.rectangle([x0 + label_width, y, x0 + label_width + length, y + bar_height], fill=colour)
            draw.text((x0 + label_width + length + 4, y + 1), f"{value:.3f}", fill="black", font=font)
    return canvas
