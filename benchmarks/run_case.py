"""One benchmark case in a fresh process: ``python -m benchmarks.run_case SPEC.json RESULT.json``.

A fresh process per case gives each its own peak memory and no warm caches from another case. ``SPEC.json`` is
written by ``benchmarks.cases.case_spec``; the result JSON holds the figures (see ``benchmarks.measure``). An option
train.py refuses ends the process with train.py's one-line error and status 2 (the caller reports the case as not
available); running out of memory writes ``{"status": "out of memory"}``.
"""

from __future__ import annotations

import sys

from pdm_lightning.core import console

if __name__ == "__main__":  # quiet the libraries' notices before they are imported
    console.install(sys.argv)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.measure import FlopCount, PeakMemory, StepClock, step_result, synchronize  # noqa: E402
from benchmarks.workspace import write_json  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_lightning(spec: dict[str, Any]) -> dict[str, Any]:
    """``train.py fit`` with the case's options, timed step by step from inside (a callback)."""
    import lightning as L

    from pdm_lightning.callbacks.export import ExportWeights
    from pdm_lightning.callbacks.samples import SampleImages
    from pdm_lightning.cli import cli_main

    warmup, steps, count = spec["warmup"], spec["steps"], spec["count_flops"]
    timed = warmup + steps
    # FLOPs on one extra step after the timed ones, or (real shapes, where a step is long and the counter's
    # per-op cost is lost in it) on the last timed step itself.
    in_timed = spec.get("flops_in_timed_step", False)
    flop_step = timed - 1 if in_timed else timed
    total = timed + (1 if count and not in_timed else 0)
    cli = cli_main([*spec["args"], "--trainer.max_steps", str(total)], run=False)
    device = cli.trainer.strategy.root_device
    clock, memory, flops = StepClock(device), PeakMemory(device), FlopCount()
    seen: dict[str, Any] = {"batches": 0, "first_loss": None, "peak": None, "at_start": None}

    class Probe(L.Callback):
        """Ticks the clock at each batch end; counts FLOPs on one batch."""

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["at_start"] = memory.current()
            memory.reset()

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
            if count and seen["batches"] == flop_step:
                synchronize(device)
                flops.start()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            index = seen["batches"]
            seen["batches"] += 1
            if count and index == flop_step:
                synchronize(device)
                flops.stop()
            if index >= timed:
                return
            clock.tick()
            if seen["first_loss"] is None and outputs is not None:
                seen["first_loss"] = float(outputs["loss"])
            if index == timed - 1:
                seen["peak"] = memory.read()

    if not spec.get("outputs"):  # end-of-fit work is not part of a step
        cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if not isinstance(cb, (ExportWeights, SampleImages))]
    cli.trainer.callbacks.append(Probe())
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start

    result = step_result(clock, warmup, steps, seen["peak"], memory, flops)
    result["memory_at_train_start_bytes"] = seen["at_start"]
    result["first_loss"] = seen["first_loss"]
    result["trained_parameters"] = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    result["fit_seconds"] = fit_seconds
    if spec.get("outputs"):
        result.update(outputs_report(Path(cli.trainer.log_dir or spec["run_dir"]), spec["model"]))
        result["peak_memory_with_outputs_bytes"] = memory.read()
    return result


def outputs_report(run_dir: Path, base_model: str) -> dict[str, Any]:
    """Sizes of the checkpoint and the exports, and each export loaded back the way users load it."""
    from diffusers import StableDiffusionPipeline

    report: dict[str, Any] = {"checkpoint_bytes": folder_bytes(run_dir / "checkpoints"), "exports": {}}
    export = run_dir / "export"
    pipeline, lora = export / "pipeline", export / "lora"
    for path in sorted(export.glob("*")) if export.exists() else []:
        if path.suffix == ".json":  # the export set's manifest
            continue
        report["exports"][path.name] = folder_bytes(path) if path.is_dir() else path.stat().st_size
    loaded = {}
    if (pipeline / "model_index.json").is_file():
        start = time.perf_counter()
        StableDiffusionPipeline.from_pretrained(pipeline)
        loaded["pipeline (from_pretrained)"] = time.perf_counter() - start
    if lora.is_dir():
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(base_model)
        pipe.load_lora_weights(lora)
        loaded["lora (load_lora_weights)"] = time.perf_counter() - start
    report["exports_loaded_seconds"] = loaded
    return report


def run_bank(spec: dict[str, Any]) -> dict[str, Any]:
    """The teacher bank of the case's photos built from scratch (models loaded first, not timed).

    With ``count_flops``, two short untimed builds of the same batch come first, under the FLOP counter (1 and 2 inversion steps): they
    warm the kernels up, and their difference is the FLOPs of the UNet calls alone (the VAE encode and the prompt
    cancel out), so FLOPs per photo = UNet calls x FLOPs per call + that fixed part. They run eagerly: a compiled
    build's time includes its compilation, as a user's first build does.
    """
    from pdm_lightning.core.loading import load_components
    from pdm_lightning.pdm.bank import BankSettings, QueryBank, build_bank

    device = torch.device(spec["device"])
    images = [Path(p) for p in spec["images"]]
    settings = BankSettings(spec["model"], spec["class_prompt"], spec["resolution"], inversion_steps=spec["inversion_steps"],
                            dtype="float16", mode="bank", compute_dtype=spec["compute_dtype"])
    components = load_components(spec["model"])
    memory = PeakMemory(device)
    batch = min(spec["batch_size"], len(images))
    with tempfile.TemporaryDirectory(dir=spec["run_dir"]) as tmp:
        counted = []
        for steps in (1, 2) if spec["count_flops"] else ():
            flops = FlopCount()
            with flops.counting():
                warm = build_bank(replace(settings, inversion_steps=steps), images[:batch], Path(tmp) / f"warm{steps}",
                                  batch_size=batch, device=device, components=components, progress=False)
            counted.append((flops.total, warm.unet_calls))
        memory.reset()
        synchronize(device)
        start = time.perf_counter()
        report = build_bank(settings, images, Path(tmp) / "bank", batch_size=batch, device=device,
                            components=components, progress=False, compile_unet=bool(spec.get("compile_unet")))
        synchronize(device)
        seconds = time.perf_counter() - start
        bank = QueryBank(report.files)
        rows = len(bank.timesteps)
        bytes_per_photo = bank.bytes_per_image()
        query_shape = list(bank.query_shape)
    flops_per_photo = None
    if counted:
        (flops_1, calls_1), (flops_2, calls_2) = counted
        per_call = (flops_2 - flops_1) / (calls_2 - calls_1)  # one UNet call over the batch
        fixed = flops_1 - per_call * calls_1  # the batch's VAE encode and the class prompt's text encoding
        calls_per_batch = report.unet_calls / -(-len(images) // batch)
        flops_per_photo = (per_call * calls_per_batch + fixed) / batch
    bytes_per_row = 2 * int(torch.Size(query_shape).numel())  # float16 rows
    return {
        "s_per_photo": seconds / len(images),
        "photos": len(images),
        "batch_size": batch,
        "unet_calls": report.unet_calls,
        "rows": rows,
        "query_shape": query_shape,
        "bytes_per_row": bytes_per_row,
        "bytes_per_photo": bytes_per_photo,
        "faithful_bytes_per_photo": bytes_per_row * 1000,  # the faithful bank: a row for each of the 1000 timesteps
        "peak_memory_bytes": memory.read(),
        "memory_kind": memory.kind,
        "flops_per_photo": flops_per_photo,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "lightning":
        return run_lightning(spec)
    if spec["kind"] == "plain":
        from benchmarks.plain_loop import run as run_plain

        return run_plain(spec)
    return run_bank(spec)


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        result = {"status": "ok", **run(spec)}
    except torch.OutOfMemoryError as error:
        result = {"status": "out of memory", "note": str(error).splitlines()[0]}
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
