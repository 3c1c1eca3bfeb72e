"""Running one benchmark case in a fresh process (``python -m benchmarks.run_case``), with a time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.cases import RunSettings
from benchmarks.workspace import REPO_ROOT, unknown_option


def case_env(settings: RunSettings) -> dict[str, str]:
    """The case processes' environment: the repository importable, no hub, the thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.device == "cpu":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)
    return env


def run_process(spec: dict[str, Any], workdir: Path, label: str, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs one case in a fresh process; returns its result, or a status and a note saying why there is none."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (logs / f"{label}{suffix}" for suffix in (".spec.json", ".result.json", ".log"))
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.run_case", str(spec_path), str(result_path)]
    with open(log_path, "w") as log:
        # Its own process group: a case that runs past its time is stopped with everything it started.
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"status": "timed out", "note": f"stopped after the case time limit ({timeout:.0f} s)"}
    text = log_path.read_text(errors="replace")
    if code == 0 and result_path.is_file():
        return json.loads(result_path.read_text())
    option = unknown_option(text)
    if code == 2 and option:
        return {"status": "not available", "note": f"train.py does not accept {option} yet"}
    if code in (-signal.SIGKILL, 137):
        return {"status": "failed", "note": "killed (out of memory?)"}
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return {"status": "failed", "note": f"exit {code}: {lines[-1] if lines else '(no output)'} (log: {log_path})"}
