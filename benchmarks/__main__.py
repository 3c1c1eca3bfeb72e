"""Benchmarks of a training step, the teacher bank build, and ours against a plain PyTorch loop.

    python -m benchmarks --json bench.json                                 # tiny model, CPU, 256 px, 1 thread
    python -m benchmarks --preset sd15 --device cuda --resolution 512 --json bench.json
    python -m benchmarks --cases 'full_prior_pdm' 'plain_full_prior_pdm' --repeats 5
    python -m benchmarks.readme_table bench.json                           # the README's table from the JSON

Each case runs in a fresh process (its own peak memory: RSS since training started on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU) for ``--warmup`` untimed and ``--steps`` timed steps; a step's time is
the wall-clock gap between consecutive step ends (data loading and logging included), and the case's figure is the
median. One more untimed step is counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward).
Cases are interleaved (A B C ... A B C ...) ``--repeats`` times and each figure is the median over repeats, so a
machine's slow spell spreads over all cases instead of landing on one. Training cases run the published recipes
(configs/sd15/) through train.py; the plain-loop cases (benchmarks/plain_loop.py) the same recipe without
Lightning. ``--list`` shows the cases. The JSON is rewritten after every case, so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks import environment
from benchmarks.cases import CASES, CASES_BY_NAME, RATIOS, Case, RunSettings, case_spec
from benchmarks.processes import case_env, run_process
from benchmarks import workspace
from benchmarks.workspace import Inputs, Workspace, default_workdir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write every figure, the machine and versions here")
    parser.add_argument("--preset", default="tiny", help="base model: tiny, sd15, sd21, ... (python -m pdm_lightning.tiny --preset)")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder to use instead of a preset")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default=None, help="default: bf16-mixed on cuda, 32 on cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default 1 on the CPU)")
    parser.add_argument("--cases", nargs="+", default=["*"], help="case names or patterns, run in this order (default: all; see --list)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every case")
    parser.add_argument("--batch_size", type=int, default=1, help="instance photos per step (the recipes': 1)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of our runs")
    parser.add_argument("--photos", type=int, default=5, help="instance photos (of examples/dog)")
    parser.add_argument("--inversion_steps", type=int, default=50, help="the training cases' bank (step time does not depend on it)")
    parser.add_argument("--bank_inversion_steps", type=inversion_steps, default=50,
                        help="the bank-build cases' inversion steps, or 'faithful' (999: a row for every timestep)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s for MFU (default: by its name)")
    parser.add_argument("--workdir", type=Path, default=None, help=f"models, photos, banks (default {default_workdir()})")
    parser.add_argument("--budget_s", type=float, default=None, help="skip cases that would end past this many seconds")
    parser.add_argument("--case_timeout_s", type=float, default=1800.0, help="stop a case's process after this long")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases run at the same time (a quick check only: concurrent cases slow each other down)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (a step's time is measured from the previous step's end)")
    return args


def inversion_steps(value: str) -> int | None:
    return None if value == "faithful" else int(value)


def select_cases(patterns: list[str]) -> list[Case]:
    """The cases matching ``patterns``, in the patterns' order (the run order: most wanted first)."""
    chosen: list[Case] = []
    for pattern in patterns:
        matches = [case for case in CASES if fnmatch.fnmatchcase(case.name, pattern)]
        if not matches:
            raise SystemExit(f"error: no case matches {pattern!r}; the cases: {', '.join(CASES_BY_NAME)}")
        chosen += [case for case in matches if case not in chosen]
    return chosen


def unavailable_reason(case: Case, settings: RunSettings, inputs: Inputs) -> str | None:
    if case.cuda_only and settings.device != "cuda":
        return "needs a CUDA GPU"
    if case.needs and importlib.util.find_spec(case.needs) is None:
        return f"{case.needs} is not installed"
    if case.kind == "plain":
        model_index = json.loads((inputs.model / "model_index.json").read_text())
        if model_index.get("_class_name") != "StableDiffusionPipeline":
            return f"the plain loop covers SD1.x/SD2.x pipelines, not {model_index.get('_class_name')}"
    return None


def summarise(entry: dict[str, Any], peak_tflops: float | None) -> None:
    """The case's figures over its runs: medians of times, the largest peak memory, FLOPs and MFU."""
    runs = [run for run in entry["runs"] if run.get("status") == "ok"]
    if not runs:
        return
    entry["status"] = "ok"
    entry["memory_kind"] = runs[0].get("memory_kind")
    entry["peak_memory_bytes"] = max(run["peak_memory_bytes"] for run in runs)
    if "ms_per_step" in runs[0]:
        times = [run["ms_per_step"] for run in runs]
        entry["ms_per_step"] = statistics.median(times)
        entry["ms_per_step_range"] = [min(times), max(times)]
        entry["flops_per_step"] = next((run["flops_per_step"] for run in runs if run.get("flops_per_step")), None)
        entry["trained_parameters"] = runs[0].get("trained_parameters")
        entry["first_loss"] = runs[0].get("first_loss")
        work, seconds = entry["flops_per_step"], entry["ms_per_step"] / 1e3
    else:
        times = [run["s_per_photo"] for run in runs]
        entry["s_per_photo"] = statistics.median(times)
        entry["s_per_photo_range"] = [min(times), max(times)]
        for key in ("photos", "batch_size", "unet_calls", "rows", "query_shape", "bytes_per_row", "bytes_per_photo",
                    "faithful_bytes_per_photo", "flops_per_photo"):
            entry[key] = runs[0].get(key)
        work, seconds = entry["flops_per_photo"], entry["s_per_photo"]
    entry["mfu"] = work / seconds / (peak_tflops * 1e12) if peak_tflops and work else None


def ratios(cases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for numerator, denominator, label in RATIOS:
        a, b = cases.get(numerator, {}), cases.get(denominator, {})
        key = "ms_per_step" if "ms_per_step" in a else "s_per_photo"
        if a.get(key) and b.get(key):
            found.append({"label": label, "numerator": numerator, "denominator": denominator, "value": a[key] / b[key]})
    return found


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is not None:
        workspace.write_json(path, document)


def describe(name: str, run: dict[str, Any]) -> str:
    if run.get("status") != "ok":
        return f"{name}: {run['status']} ({run.get('note', '')})"
    memory = f"{run['peak_memory_bytes'] / 2**20:.0f} MiB peak"
    if "ms_per_step" in run:
        flops = f", {run['flops_per_step'] / 1e9:.1f} GFLOP/step" if run.get("flops_per_step") else ""
        return f"{name}: {run['ms_per_step']:.1f} ms/step, {memory}{flops}"
    return f"{name}: {run['s_per_photo']:.2f} s/photo ({run['unet_calls']} UNet calls), {memory}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:32s} {case.label}{'' if case.required else '  (optional)'}")
        return 0
    cases = select_cases(args.cases)
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    settings = RunSettings(
        device=device,
        precision=args.precision or ("bf16-mixed" if device == "cuda" else "32"),
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        threads=args.threads or (1 if device == "cpu" else os.cpu_count() or 1),
        steps=args.steps,
        warmup=args.warmup,
        inversion_steps=args.inversion_steps,
        bank_inversion_steps=args.bank_inversion_steps,
    )
    started = time.monotonic()
    workdir = args.workdir or default_workdir()
    env = case_env(settings)
    machine = environment.machine()
    peak_tflops = args.peak_tflops or (environment.peak_bf16_tflops(machine["gpu"]) if device == "cuda" else None)
    document: dict[str, Any] = {
        "date": environment.now(),
        "machine": machine,
        "versions": environment.versions(),
        "settings": {
            "preset": None if args.model else args.preset, "model": str(args.model) if args.model else None,
            "device": device, "precision": settings.precision, "resolution": settings.resolution,
            "threads": settings.threads, "batch_size": settings.batch_size, "num_workers": settings.num_workers,
            "photos": args.photos, "steps": settings.steps, "warmup": settings.warmup, "repeats": args.repeats,
            "inversion_steps": settings.inversion_steps, "bank_inversion_steps": settings.bank_inversion_steps,
            "peak_tflops": peak_tflops,
        },
        "method": "each case in a fresh process; step time = median gap between consecutive step ends after the "
                  "warm-up; cases interleaved, figure = median over repeats; FLOPs of one extra step (forward + "
                  "backward) with FlopCounterMode",
        "jobs": args.jobs,
        "cases": {case.name: {"label": case.label, "kind": case.kind, "required": case.required, "status": "pending",
                              "runs": []} for case in cases},
        "ratios": [],
    }
    print(f"Benchmarks: {len(cases)} cases x {args.repeats} repeats, {args.preset if not args.model else args.model}, "
          f"{settings.resolution} px, {device}, precision {settings.precision}, {settings.threads} thread(s); work folder {workdir}",
          flush=True)
    inputs = Workspace(workdir).inputs(args.preset, args.model, args.photos, settings.resolution, env=env)
    document["settings"]["model_dir"] = str(inputs.model)
    for case in cases:
        reason = unavailable_reason(case, settings, inputs)
        if reason:
            document["cases"][case.name].update(status="not available", note=reason)
    durations: dict[str, float] = {}

    def run_case(case: Case, repeat: int) -> dict[str, Any]:
        """One run of ``case`` (in a worker thread with --jobs), unless the budget would be passed by starting it now."""
        elapsed = time.monotonic() - started
        expected = durations.get(case.name, statistics.median(durations.values()) if durations else 0.0)
        if args.budget_s is not None and elapsed + expected > args.budget_s:
            return {"status": "skipped", "note": f"{elapsed:.0f} s used, about {expected:.0f} s more would pass the "
                                                 f"time budget of {args.budget_s:.0f} s"}
        timeout = args.case_timeout_s
        if args.budget_s is not None:
            timeout = max(30.0, min(timeout, args.budget_s - elapsed))
        run_dir = inputs.runs / f"{case.name}-r{repeat}"
        spec = case_spec(case, settings, inputs, run_dir, count_flops=repeat == 0)
        start = time.monotonic()
        run = run_process(spec, workdir, f"{case.name}-r{repeat}", timeout, env)
        durations[case.name] = time.monotonic() - start
        shutil.rmtree(run_dir, ignore_errors=True)
        return run

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for repeat in range(args.repeats):
            runnable = [case for case in cases if document["cases"][case.name]["status"] in ("pending", "ok")]
            futures = {pool.submit(run_case, case, repeat): case for case in runnable}
            for future in as_completed(futures):
                case, run = futures[future], future.result()
                entry = document["cases"][case.name]
                seconds = f" ({durations[case.name]:.0f} s)" if run.get("status") != "skipped" else ""
                print(f"[{repeat + 1}/{args.repeats}] {describe(case.name, run)}{seconds}", flush=True)
                if run.get("status") == "ok":
                    entry["runs"].append(run)
                    summarise(entry, peak_tflops)
                elif entry["status"] != "ok":  # a case that measured before keeps its figures, with the note
                    entry.update(status=run["status"], note=run.get("note"))
                else:
                    entry["note"] = f"repeat {repeat + 1}: {run['status']} ({run.get('note')})"
                document["ratios"] = ratios(document["cases"])
                document["seconds"] = time.monotonic() - started
                write_json(args.json, document)
    document["seconds"] = time.monotonic() - started
    write_json(args.json, document)

    from benchmarks.readme_table import render

    print()
    print(render(document))
    failed = [name for name, entry in document["cases"].items() if entry["status"] == "failed"]
    return 1 if failed else 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
