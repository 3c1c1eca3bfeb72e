"""Each SD1.5 recipe through train.py on the CPU at SD1.5's real shapes (random weights), exports loaded back.

    python -m benchmarks.real_shape --json real_shape.json             # every recipe, 256 + 512 px, fp32 + bf16-mixed
    python -m benchmarks.real_shape --recipes pdmbooth_lora --resolutions 256 --precisions 32
    python -m benchmarks.real_shape --preset tiny --resolutions 64 128   # the same path on the tiny model, in a minute

The base model is the ``sd15`` preset (``python -m pdm_lightning.tiny --preset sd15``: SD1.5's architecture and
parameter counts, CLIP's real tokenizer, random weights). For each precision, resolution and recipe a fresh process
runs ``train.py fit`` with the recipe's config (configs/sd15/base.yaml + the recipe; the bundled dog masks instead of
CLIPSeg's, 4 noise class images for prior preservation, a bank of ``--inversion_steps``) for 2 optimizer steps: the
second is timed and its FLOPs counted (FlopCounterMode, forward + backward). The end-of-fit checkpoint and exports
are then measured and loaded back as users load them (the pipeline folder with ``from_pretrained``, the LoRA folder
with ``load_lora_weights`` on the base model). Last, the teacher bank of one photo is built at the largest resolution
with a short inversion; its row size gives the faithful bank's size per photo (1000 rows).

A run is skipped, saying why, when it would need more than 90% of the memory available: a recipe's first run when
its weights, gradients and optimizer state alone would (read off the model's file sizes), a higher resolution when
the same recipe's run at a lower one predicts it (activations scale with the pixels, weights and optimizer state do
not). A run the kernel kills for memory is reported as such. Peak memory is the case process's peak RSS since training started.
Machinery shared with ``python -m benchmarks`` (benchmarks/cases.py, run_case.py, processes.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import environment
from benchmarks.cases import CASES_BY_NAME, Case, RunSettings, case_spec, merged_recipe
from benchmarks.processes import case_env, run_process
from benchmarks.readme_table import flops, number, size
from benchmarks.workspace import Workspace, default_workdir, write_json

# Each recipe of configs/sd15/ (and its on-the-fly-teacher variant) as a benchmark case.
RECIPES: dict[str, Case] = {
    "pdmbooth": CASES_BY_NAME["full_prior_pdm"],
    "pdmbooth_on_the_fly": CASES_BY_NAME["full_prior_pdm_otf"],
    "dreambooth": CASES_BY_NAME["full_prior"],
    "pdmbooth_lora": CASES_BY_NAME["lora_pdm"],
    "pdmbooth_lora_on_the_fly": Case("lora_pdm_otf", "LoRA, PDM (on-the-fly teacher), no prior", "lightning",
                                     "pdmbooth_lora", pdm="on_the_fly"),
    "dreambooth_lora": CASES_BY_NAME["lora_dreambooth"],
}
ADAM_BYTES_PER_TRAINED_PARAMETER = 12  # float32 gradient + AdamW's two moments, allocated at the first step


def predicted_peak(lower: dict[str, Any], lower_resolution: int, resolution: int) -> int | None:
    """The peak memory at ``resolution`` predicted from a run at ``lower_resolution``: what training holds at its
    start plus the optimizer state stay; the rest (activations) grows with the pixel count."""
    if lower.get("status") != "ok" or not lower.get("memory_at_train_start_bytes"):
        return None
    fixed = lower["memory_at_train_start_bytes"] + ADAM_BYTES_PER_TRAINED_PARAMETER * lower["trained_parameters"]
    growing = max(0, lower["peak_memory_bytes"] - fixed)
    return int(fixed + growing * (resolution / lower_resolution) ** 2)


def weights_bytes(model_dir: Path, part: str) -> int:
    return sum(f.stat().st_size for f in (model_dir / part).glob("*.safetensors"))


def lower_bound_peak(model_dir: Path, case: Case, precision: str) -> int:
    """What the weights alone take before any activation (for a recipe's first, lowest-resolution run): trained
    parts 4x their float32 size (weights, gradients, AdamW's two moments), frozen parts in the compute dtype, and
    the frozen teacher copy of an on-the-fly full fine-tune."""
    half = 0.5 if precision.startswith("bf16") else 1.0
    full = case.name.startswith("full")
    trained = ["unet"] + (["text_encoder"] if full and merged_recipe(case.recipe)["model"].get("train_text_encoder") else [])
    frozen = [part for part in ("unet", "text_encoder", "vae") if part not in trained or not full]
    total = sum(4 * weights_bytes(model_dir, part) for part in trained if full)
    total += sum(half * weights_bytes(model_dir, part) for part in frozen)
    if full and case.pdm == "on_the_fly":
        total += half * weights_bytes(model_dir, "unet")
    return int(total)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_shape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15", help="sd15 (default), sd21, or tiny for a quick run of the same path")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder to use instead of a preset")
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--precisions", nargs="+", choices=("32", "bf16-mixed"), default=["32", "bf16-mixed"])
    parser.add_argument("--inversion_steps", type=int, default=2, help="the training runs' and the bank build's inversion")
    parser.add_argument("--no_bank", action="store_true", help="leave out the bank build")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--available_gib", type=float, default=None,
                        help="memory a run may use (default: MemAvailable when it starts)")
    parser.add_argument("--workdir", type=Path, default=None, help=f"default {default_workdir()}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--case_timeout_s", type=float, default=7200.0)
    return parser.parse_args(argv)


def memory_note(predicted: int | None, available: int | None, source: str) -> str | None:
    """Why a run is skipped (None: run it)."""
    if predicted is None or available is None or predicted <= 0.9 * available:
        return None
    return f"predicted peak {predicted / 2**30:.1f} GiB ({source}) > 90% of the {available / 2**30:.1f} GiB available"


def render(results: dict[str, Any]) -> str:
    lines = [
        f"{results['date'][:10]}, {results['machine']['cpu']} ({results['machine']['cores']} cores, "
        f"{results['machine']['memory_gib']} GiB), {results['settings']['threads']} thread(s), model "
        f"`{results['settings']['model']}`; 2 optimizer steps per run, the second timed; peak RSS since training started.",
        "",
        "| recipe | px | precision | ran | s/step | peak RSS | FLOP/step | checkpoint | exports | exports loaded back |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for run in results["runs"]:
        head = f"| {run['recipe']} | {run['resolution']} | {run['precision']} |"
        if run["status"] != "ok":
            lines.append(f"{head} {run['status']}: {run.get('note', '')} | | | | | | |")
            continue
        exports = ", ".join(f"{name} {size(value)}" for name, value in run.get("exports", {}).items()) or "-"
        loaded = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.get("exports_loaded_seconds", {}).items()) or "-"
        lines.append(
            f"{head} yes | {number(run['ms_per_step'] / 1e3, 1)} | {size(run['peak_memory_bytes'])} | "
            f"{flops(run.get('flops_per_step'))} | {size(run.get('checkpoint_bytes'))} | {exports} | {loaded} |"
        )
    if results.get("banks"):
        lines += ["", "| bank build (1 photo) | px | compute | inversion steps | s/photo | peak RSS | row | this bank "
                      "per photo | faithful bank per photo (1000 rows) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for bank in results["banks"]:
            head = f"| | {bank['resolution']} | {bank['compute_dtype']} | {bank['inversion_steps']} |"
            if bank["status"] != "ok":
                lines.append(f"{head} {bank['status']}: {bank.get('note', '')} | | | | |")
                continue
            lines.append(f"{head} {number(bank['s_per_photo'], 1)} | {size(bank['peak_memory_bytes'])} | "
                         f"{size(bank['bytes_per_row'])} | {size(bank['bytes_per_photo'])} | "
                         f"{size(bank['faithful_bytes_per_photo'])} |")
    return "\n".join(lines) + "\n"


def write(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        write_json(path, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or default_workdir()
    resolutions = sorted(set(args.resolutions))
    base = RunSettings(device="cpu", threads=args.threads, steps=1, warmup=1, inversion_steps=args.inversion_steps,
                       bank_inversion_steps=args.inversion_steps, masks=True, outputs=True, flops_in_timed_step=True)
    env = case_env(base)
    results: dict[str, Any] = {
        "date": environment.now(), "machine": environment.machine(), "versions": environment.versions(),
        "settings": {"preset": args.preset, "model": str(args.model or args.preset), "threads": args.threads,
                     "inversion_steps": args.inversion_steps},
        "runs": [], "banks": [],
    }
    print(f"Real shapes: {', '.join(args.recipes)} at {', '.join(map(str, resolutions))} px, precision "
          f"{', '.join(args.precisions)}, {args.threads} thread(s); work folder {workdir}", flush=True)
    workspace = Workspace(workdir)
    for precision in args.precisions:
        for position, resolution in enumerate(resolutions):
            settings = replace(base, precision=precision, resolution=resolution)
            inputs = workspace.inputs(args.preset, args.model, 1, resolution, env=env)
            for recipe in args.recipes:
                case = RECIPES[recipe]
                run: dict[str, Any] = {"recipe": recipe, "resolution": resolution, "precision": precision}
                lower = next((r for r in reversed(results["runs"]) if r["recipe"] == recipe and r["precision"] == precision
                              and r["resolution"] < resolution and r["status"] == "ok"), None)
                available = int(args.available_gib * 2**30) if args.available_gib else environment.available_memory_bytes()
                if lower:
                    note = memory_note(predicted_peak(lower, lower["resolution"], resolution), available,
                                       f"from the {lower['resolution']} px run")
                else:
                    note = memory_note(lower_bound_peak(inputs.model, case, precision), available,
                                       "weights, gradients and optimizer state alone")
                if note:
                    run.update(status="skipped", note=note)
                else:
                    run_dir = inputs.runs / f"real-{recipe}-{resolution}-{precision}"
                    start = time.monotonic()
                    run.update(run_process(case_spec(case, settings, inputs, run_dir, count_flops=True), workdir,
                                           run_dir.name, args.case_timeout_s, env))
                    run["seconds"] = time.monotonic() - start
                    shutil.rmtree(run_dir, ignore_errors=True)
                results["runs"].append(run)
                print(render_line(run), flush=True)
                write(args.json, results)
            if args.no_bank or position != len(resolutions) - 1:
                continue
            bank_case = CASES_BY_NAME["bank_1photo"]
            run_dir = inputs.runs / f"real-bank-{resolution}-{precision}"
            bank = {"resolution": resolution, "compute_dtype": settings.half_dtype, "inversion_steps": args.inversion_steps,
                    **run_process(case_spec(bank_case, settings, inputs, run_dir, count_flops=False), workdir,
                                  run_dir.name, args.case_timeout_s, env)}
            shutil.rmtree(run_dir, ignore_errors=True)
            results["banks"].append(bank)
            print(f"bank build, 1 photo, {resolution} px, {settings.half_dtype}: {bank['status']} "
                  f"{number(bank.get('s_per_photo'), 1)} s/photo", flush=True)
            write(args.json, results)
    print()
    print(render(results), end="")
    return 1 if any(run["status"] == "failed" for run in results["runs"] + results["banks"]) else 0


def render_line(run: dict[str, Any]) -> str:
    head = f"{run['recipe']}, {run['resolution']} px, {run['precision']}:"
    if run["status"] != "ok":
        return f"{head} {run['status']} ({run.get('note', '')})"
    return (f"{head} {run['ms_per_step'] / 1e3:.1f} s/step, {size(run['peak_memory_bytes'])} peak RSS, "
            f"{flops(run.get('flops_per_step'))}FLOP/step, checkpoint {size(run.get('checkpoint_bytes'))}")


if __name__ == "__main__":
    sys.exit(main())
