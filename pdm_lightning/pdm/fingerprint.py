"""Content fingerprints for the bank's cache key: the base model (hub revision or local weight bytes) and images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.core.locks import file_lock

# What the bank depends on inside a diffusers pipeline folder (SDXL's second tokenizer and text encoder
# too; an SD folder has none, so its fingerprint is what it always was).
MODEL_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
KNOWN_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")
_CHUNK = 16 << 20

# (path, size, mtime_ns) -> sha256: a file is hashed once per process (and once per cache with a memo file).
_hash_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, memo_file: Path | None = None) -> str:
    """sha256 of a file's bytes, read in chunks; remembered per (path, size, mtime) in memory and in ``memo_file``."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    disk_key = "|".join(map(str, key))
    disk_memo = _load_memo(memo_file)
    digest = _hash_memo.get(key) or disk_memo.get(disk_key) or _hash_bytes(path)
    _hash_memo[key] = digest
    if memo_file is not None and disk_memo.get(disk_key) != digest:
        _remember(memo_file, disk_key, digest)
    return digest


def memo_lock_path(memo_file: Path) -> Path:
    """The lock file guarding read-modify-write of ``memo_file`` (it stays beside it, empty)."""
    return memo_file.with_name(f"{memo_file.name}.lock")


def _remember(memo_file: Path, key: str, digest: str) -> None:
    """Adds one record to the shared memo: read, update and written back under a lock, so ranks and
    concurrent runs sharing the cache never drop each other's records (the hashing itself runs unlocked)."""
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(memo_lock_path(memo_file)):
            memo = _load_memo(memo_file)
            if memo.get(key) == digest:
                return
            memo[key] = digest
            write_bytes_atomically(memo_file, json.dumps(memo, indent=0, sort_keys=True).encode())
    except OSError:  # a read-only or full cache: the memo only saves time
        pass


def _hash_bytes(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_memo(memo_file: Path | None) -> dict[str, str]:
    if memo_file is None or not memo_file.is_file():
        return {}
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):  # a damaged memo only costs a re-hash
        return {}


def _is_weight_of_variant(name: str, variant: str | None) -> bool:
    if variant is not None:
        return f".{variant}." in name or f".{variant}-" in name
    return not any(f".{known}." in name or f".{known}-" in name for known in KNOWN_VARIANTS)


def model_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The files of a local diffusers pipeline that determine the bank: configs, tokenizer, and the weights
    ``from_pretrained`` loads (safetensors over bin, the requested variant)."""
    files: list[Path] = []
    for sub in MODEL_SUBFOLDERS:
        entries = sorted(p for p in (folder / sub).glob("*") if p.is_file())
        weights = [p for p in entries if p.name.endswith(WEIGHT_SUFFIXES)]
        chosen = [p for p in weights if p.suffix == ".safetensors"] or weights
        chosen = [p for p in chosen if _is_weight_of_variant(p.name, variant)] or chosen
        files += [p for p in entries if p not in weights] + chosen
    return files


def model_fingerprint(
    pretrained_model_name_or_path: str, revision: str | None = None, variant: str | None = None, memo_file: Path | None = None
) -> str:
    """Identifies the base model's weights: the bytes of a local folder's files, or a hub id at its commit.

    A hub id is resolved to the commit its files come from (from the local hub cache when offline);
    when that fails the revision name is used as given.
    """
    folder = Path(pretrained_model_name_or_path).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in model_files(folder, variant):
            digest.update(f"{path.relative_to(folder).as_posix()}:{file_sha256(path, memo_file)}\n".encode())
        return f"local:{digest.hexdigest()}"
    commit = _hub_commit(pretrained_model_name_or_path, revision) or revision or "main"
    return f"hub:{pretrained_model_name_or_path}@{commit}" + (f":{variant}" if variant else "")


def vae_fingerprint(vae_name_or_path: str, memo_file: Path | None = None) -> str:
    """Identifies a replacement VAE (``--model.vae_name_or_path``) as ``core.loading.load_vae`` reads it: the bytes
    of a folder holding config.json and weights (or of a pipeline folder's ``vae/``), or a hub id at its commit."""
    folder = Path(vae_name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file() and (folder / "vae").is_dir():
            folder = folder / "vae"
        files = sorted(p for p in folder.glob("*") if p.is_file())
        weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
        chosen = [p for p in weights if p.suffix == ".safetensors"] or weights
        digest = hashlib.sha256()
        for path in [p for p in files if p not in weights] + chosen:
            digest.update(f"{path.name}:{file_sha256(path, memo_file)}\n".encode())
        return f"local:{digest.hexdigest()}"
    commit = _hub_commit(vae_name_or_path, None, "config.json") or "main"
    return f"hub:{vae_name_or_path}@{commit}"


def _hub_commit(repo_id: str, revision: str | None, filename: str = "model_index.json") -> str | None:
    try:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception:  # noqa: BLE001 - no commit to resolve: fall back to the revision name
        return None
    # The hub cache keeps files under snapshots/<commit>/.
    return index.parent.name if index.parent.parent.name == "snapshots" else None
