#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU, done in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # JSON + Markdown to $OUT if set, else OUT_DIR (default runs/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run [DIR]  # the same steps on the CPU: tiny model, 64 px, a few steps (~2 min)
#
# 1. Installs diffusers, jsonargparse and their missing requirements from .whl/ (made beforehand on a machine with
#    PyPI by benchmarks/fetch_gpu_wheels.sh) into /tmp/site, when diffusers or jsonargparse does not import: only the
#    wheels whose package the machine lacks, with no index and no dependencies resolved.
# 2. Runs `python -m benchmarks` on the SD1.5-shaped random model (built here: python -m pdm_lightning.tiny --preset
#    sd15) at 512 px in bf16-mixed: each SD1.5 recipe and its variants for 2 warm-up + 5 timed steps (SDPA attention;
#    xformers and 8-bit AdamW only where importable), ours against the plain PyTorch loop, torch.compile against eager,
#    and the teacher bank's build (50 inversion steps; 1 photo, then all photos batched against one at a time). Each
#    case reports step time, peak torch.cuda.max_memory_allocated, FLOPs per step and MFU. Cases run in priority
#    order under one time budget: what would not finish in time is skipped, and the JSON says so.
# 3. Writes the README table (python -m benchmarks.readme_table) next to the JSON, with each case's log in logs/.
#
# The dry run takes the same path with the tiny preset on the CPU (the wheel install only when diffusers does not
# import; the compiled cases left out: compiling on a CPU takes minutes). tests/test_benchmarks.py runs it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
START=$(date +%s)
DRY_RUN=0
FOLDER=
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) FOLDER=$arg ;;
    esac
done
OUT_DIR=${OUT:-${FOLDER:-$REPO/runs/gpu_check}}
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then :
elif [ "$DRY_RUN" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=python3
fi
BUDGET_S=${BUDGET_S:-480}  # the whole command, install and model build included

say() { echo "[gpu_check $(( $(date +%s) - START )) s] $*"; }

# --- 1. the missing packages, from .whl/ -------------------------------------------------------------------------
if ! "$PYTHON" -c "import diffusers, jsonargparse" 2>/dev/null; then
    if [ ! -d "$REPO/.whl" ]; then
        echo "error: diffusers or jsonargparse does not import and there is no .whl/ folder: run" \
             "bash benchmarks/fetch_gpu_wheels.sh on a machine with PyPI and bring .whl/ along." >&2
        exit 1
    fi
    missing=$("$PYTHON" - "$REPO/.whl" <<'EOF'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
)
    say "installing into /tmp/site: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086 - one path per word
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $missing
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
    "$PYTHON" -c "import diffusers, jsonargparse" || { echo "error: diffusers or jsonargparse still does not import (above)" >&2; exit 1; }
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
# CLIP's vocabulary for the sd15 preset's tokenizer, without a network (pdm_lightning/clip_vocab.py).
if [ -z "${PDM_LIGHTNING_CLIP_BPE:-}" ] && [ -f "$REPO/.whl/bpe_simple_vocab_16e6.txt.gz" ]; then
    export PDM_LIGHTNING_CLIP_BPE=$REPO/.whl/bpe_simple_vocab_16e6.txt.gz
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# --- 2. the benchmarks -----------------------------------------------------------------------------------------------
# Priority order: ours against the plain loop, torch.compile against eager and the batched bank build first (the
# comparisons the check exists for), then the published recipes, then the variants (the budget drops the tail).
CASES=(full_prior_pdm plain_full_prior_pdm full_prior_pdm_compiled bank_batched bank_sequential lora_pdm full_prior
       lora_dreambooth full_dreambooth plain_full_dreambooth bank_1photo lora_prior_pdm plain_lora_prior_pdm
       plain_lora_dreambooth full_prior_pdm_otf full_prior_pdm_uncached full_prior_pdm_latent_crops
       full_prior_pdm_channels_last full_prior_pdm_unfused full_prior_pdm_xformers full_prior_pdm_adamw8bit
       full_prior_pdm_compiled_unet bank_1photo_compiled lora_prior lora_prior_pdm_otf)
if [ "$DRY_RUN" = 1 ]; then
    kept=()
    for case in "${CASES[@]}"; do [[ $case == *compiled* ]] || kept+=("$case"); done
    CASES=("${kept[@]}")
    say "dry run on the CPU: tiny model, 64 px, bf16-mixed; compiled cases left out (compiling takes minutes on a CPU)"
    ARGS=(--preset tiny --device cpu --precision bf16-mixed --resolution 64 --steps 2 --warmup 1 --repeats 1
          --photos 2 --inversion_steps 2 --bank_inversion_steps 2 --jobs 2 --case_timeout_s 300)
    WORKDIR=${WORKDIR:-$OUT_DIR/work}
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "error: no CUDA GPU visible to torch (use --dry-run for the CPU check)" >&2; exit 1; }
    ARGS=(--preset sd15 --device cuda --precision bf16-mixed --resolution 512 --steps 5 --warmup 2 --repeats 1
          --photos 5 --inversion_steps 2 --bank_inversion_steps 50 --case_timeout_s 240)
    WORKDIR=${WORKDIR:-/tmp/pdm_lightning_benchmarks}
fi
LEFT=$(( BUDGET_S - ($(date +%s) - START) - 20 ))  # 20 s kept for the table
JSON=$OUT_DIR/gpu_check.json
say "python -m benchmarks, ${LEFT} s budget, work folder $WORKDIR, results $JSON"
status=0
"$PYTHON" -m benchmarks "${ARGS[@]}" --budget_s "$LEFT" --workdir "$WORKDIR" --json "$JSON" --cases "${CASES[@]}" || status=$?

# --- 3. the README table (and each case's log, to read a failure where the work folder stays behind) ----------------
if [ "$DRY_RUN" = 0 ] && [ -d "$WORKDIR/logs" ]; then
    mkdir -p "$OUT_DIR/logs" && cp "$WORKDIR"/logs/*.log "$OUT_DIR/logs/" 2>/dev/null || true
fi
if [ -f "$JSON" ]; then
    "$PYTHON" -m benchmarks.readme_table "$JSON" > "$OUT_DIR/gpu_check.md"
    say "README table: $OUT_DIR/gpu_check.md"
fi
say "done (exit $status)"
exit $status
