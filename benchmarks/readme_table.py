"""The README's benchmark tables, generated from a ``python -m benchmarks --json FILE`` result.

    python -m benchmarks.readme_table bench.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

NONE = "-"
MEMORY_KINDS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated since training started",
    "rss_since_training_start": "peak RSS of the case's process since training started (VmHWM after a reset)",
    "rss_lifetime": "peak RSS of the case's whole process (ru_maxrss)",
}


def size(value: float | None) -> str:
    if value is None:
        return NONE
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}" if value < 10 * scale else f"{value / scale:.0f} {unit}"
    return f"{value:.0f} B"


def flops(value: float | None) -> str:
    if not value:
        return NONE
    return f"{value / 1e12:.2f} T" if value >= 1e12 else f"{value / 1e9:.2f} G"


def number(value: float | None, digits: int = 1) -> str:
    return NONE if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:.1f}%"


def conditions(document: dict[str, Any]) -> str:
    """One paragraph: where, with what, and how the figures were taken."""
    settings, machine, versions = document["settings"], document["machine"], document["versions"]
    model = settings.get("preset") or settings.get("model")
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    peak = f" (peak {settings['peak_tflops']:.0f} TFLOP/s bf16 for MFU)" if settings.get("peak_tflops") else ""
    library = ", ".join(f"{name} {version}" for name, version in versions.items())
    steps = any(entry["kind"] != "bank" for entry in document["cases"].values())
    return (
        f"Measured {document['date'][:10]} with `python -m benchmarks` on {machine['cpu']} ({machine['cores']} cores"
        f"{gpu}){peak}; {library}. Model `{model}`, {settings['resolution']} px, batch {settings['batch_size']}, "
        f"{settings['device']}, precision {settings['precision']}, {settings['threads']} thread(s)."
        + (f" Step time: median over {settings['repeats']} interleaved runs (each the median of {settings['steps']} "
           f"steps after {settings['warmup']} warm-up steps, data loading included)." if steps else
           f" Median over {settings['repeats']} interleaved runs.")
        + f" Memory: {MEMORY_KINDS.get(_memory_kind(document), 'peak memory')}."
        + (" FLOPs: one training step, forward + backward (FlopCounterMode)." if steps else "")
        + (f" {document['jobs']} cases ran at a time: a quick check, not a measurement." if document.get("jobs", 1) > 1 else "")
    )


def _memory_kind(document: dict[str, Any]) -> str | None:
    return next((entry.get("memory_kind") for entry in document["cases"].values() if entry.get("memory_kind")), None)


def status_note(entry: dict[str, Any]) -> str:
    return f"{entry['status']}: {entry.get('note') or ''}".rstrip(": ")


def training_table(cases: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| case | ms/step | range | peak memory | FLOP/step | MFU |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for entry in cases.values():
        if entry["kind"] == "bank":
            continue
        if entry["status"] != "ok":
            lines.append(f"| {entry['label']} | {status_note(entry)} | | | | |")
            continue
        low, high = entry["ms_per_step_range"]
        lines.append(
            f"| {entry['label']} | {number(entry['ms_per_step'])} | {number(low)}-{number(high)} | "
            f"{size(entry['peak_memory_bytes'])} | {flops(entry.get('flops_per_step'))} | {percent(entry.get('mfu'))} |"
        )
    return lines


def bank_table(cases: dict[str, dict[str, Any]], inversion_steps: int | None) -> list[str]:
    steps = "faithful, 999" if inversion_steps is None else inversion_steps
    lines = [
        f"| bank build ({steps} inversion steps) | s/photo | UNet calls | row | this bank per photo | "
        "faithful bank per photo | peak memory | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in cases.values():
        if entry["kind"] != "bank":
            continue
        if entry["status"] != "ok":
            lines.append(f"| {entry['label']} | {status_note(entry)} | | | | | | |")
            continue
        lines.append(
            f"| {entry['label']} | {number(entry['s_per_photo'], 2)} | {entry['unet_calls']} | {size(entry['bytes_per_row'])} | "
            f"{size(entry['bytes_per_photo'])} | {size(entry['faithful_bytes_per_photo'])} | "
            f"{size(entry['peak_memory_bytes'])} | {percent(entry.get('mfu'))} |"
        )
    return lines


def render(document: dict[str, Any], measured_only: bool = False) -> str:
    """Markdown: the conditions, the training-step table, the bank-build table, the ratios. ``measured_only``: the
    cases that were skipped or not available are named in one line instead of a table row each."""
    cases = document["cases"]
    parts = [conditions(document), ""]
    if measured_only:
        left_out = [entry["label"] for entry in cases.values() if entry["status"] in ("skipped", "not available")]
        cases = {name: entry for name, entry in cases.items() if entry["status"] not in ("skipped", "not available")}
        if left_out:
            parts += [f"Not run (time budget) or not available here: {'; '.join(left_out)}.", ""]
    if any(entry["kind"] != "bank" for entry in cases.values()):
        parts += training_table(cases) + [""]
    if any(entry["kind"] == "bank" for entry in cases.values()):
        parts += bank_table(cases, document["settings"]["bank_inversion_steps"]) + [""]
    if document.get("ratios"):
        parts += [f"- {ratio['label']}: {ratio['value']:.2f}" for ratio in document["ratios"]]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file", type=Path, help="written by python -m benchmarks --json")
    parser.add_argument("--measured_only", action="store_true",
                        help="rows for the cases that ran; skipped and unavailable ones named in one line")
    args = parser.parse_args(argv)
    print(render(json.loads(args.json_file.read_text()), args.measured_only), end="")


if __name__ == "__main__":
    main()
