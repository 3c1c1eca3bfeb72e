#!/usr/bin/env bash
# Downloads what benchmarks/gpu_check.sh installs on a GPU machine that reaches no package index, into .whl/
# (git-ignored) at the repository root. Run it here, with PyPI; then carry .whl/ to the GPU machine with the checkout.
#
#   bash benchmarks/fetch_gpu_wheels.sh              # diffusers, jsonargparse and their requirements + CLIP's vocabulary
#   bash benchmarks/fetch_gpu_wheels.sh --extras     # also bitsandbytes (large), and xformers if one matches $GPU_TORCH
#
# The GPU machine (Python 3.12, torch 2.11 cu130) has torch, lightning, transformers, peft, torchmetrics,
# tensorboard, safetensors, huggingface-hub, numpy, pillow, regex, tokenizers, tqdm and pyyaml, but not diffusers or
# jsonargparse. Each wheel is pinned to the version this checkout's .venv has (so the GPU run uses what the tests
# ran with); gpu_check.sh installs only the ones whose package the machine lacks. CLIP's BPE vocabulary (which the
# sd15 / sd21 presets' tokenizer needs, pdm_lightning/clip_vocab.py) is copied in as
# .whl/bpe_simple_vocab_16e6.txt.gz; gpu_check.sh points $PDM_LIGHTNING_CLIP_BPE at it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DEST=$REPO/.whl
GPU_TORCH=${GPU_TORCH:-2.11}
EXTRAS=0
for arg in "$@"; do
    case $arg in
        --extras) EXTRAS=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

# diffusers and jsonargparse[signatures,ruamel], and what they need that the GPU machine lacks (requests and its
# four are diffusers' pipeline_utils imports; importlib_metadata needs zipp and lazy-importer).
PACKAGES=(diffusers jsonargparse docstring_parser typeshed_client ruamel.yaml importlib_metadata zipp lazy-importer
          requests urllib3 idna certifi charset_normalizer)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)

download() {  # NAME==VERSION [FOLDER, default $DEST]
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "${2:-$DEST}" "$1"
}

pinned() {  # the version of NAME in this checkout's venv
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
    version=$(pinned "$name") || { echo "error: $name is not installed in $PYTHON's environment (make install)" >&2; exit 1; }
    download "$name==$version"
    echo "  $name==$version"
done

# Optional: the C speed-up of ruamel.yaml (ruamel.yaml 0.19 runs without it).
download ruamel.yaml.clib 2>/dev/null && echo "  ruamel.yaml.clib (optional)" || echo "  ruamel.yaml.clib: no cp312 manylinux wheel, skipped"

if [ "$EXTRAS" = 1 ]; then
    # bitsandbytes' wheels are not tied to a torch version; xformers' are, to one exact torch.
    download bitsandbytes && echo "  bitsandbytes (latest)" || echo "  bitsandbytes: no wheel, skipped"
    tmp=$(mktemp -d)
    if download xformers "$tmp" 2>/dev/null; then
        wheel=$(ls "$tmp"/xformers-*.whl)
        needs=$("$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
print(" ".join(line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist: torch")))
EOF
)
        if [[ "$needs" == *"torch==$GPU_TORCH"* ]]; then
            mv "$wheel" "$DEST/" && echo "  xformers ($(basename "$wheel"), $needs)"
        else
            echo "  xformers: the latest wheel needs $needs, not torch $GPU_TORCH: skipped"
        fi
    else
        echo "  xformers: no wheel, skipped"
    fi
    rm -rf "$tmp"
fi

# CLIP's vocabulary, for the sd15 / sd21 presets' tokenizer (fetched once into the local cache if needed).
gz=$(cd "$REPO" && "$PYTHON" -c "from pdm_lightning.clip_vocab import vocabulary_gz; print(vocabulary_gz())")
cp "$gz" "$DEST/bpe_simple_vocab_16e6.txt.gz"
echo "  CLIP vocabulary: $DEST/bpe_simple_vocab_16e6.txt.gz"
du -sh "$DEST"
