"""CLIP's real byte-level BPE vocabulary (49,408 tokens), obtained offline-friendly and cached.

    python -m pdm_lightning.clip_vocab                 # fetch once, print the cached tokenizer folder
    python -m pdm_lightning.clip_vocab runs/clip-tok   # also write a tokenizer folder there
    python -m pdm_lightning.clip_vocab --source open_clip_torch-3.3.0-py3-none-any.whl

Stable Diffusion 1.x and 2.x tokenize prompts with the vocabulary OpenAI trained for CLIP
(``bpe_simple_vocab_16e6.txt.gz``, MIT-licensed by OpenAI). No model hub is needed for it: the file
ships inside the ``open_clip_torch`` wheel on PyPI, which ``pip download --no-deps`` fetches without
installing it (installing would pull torchvision). The text is checked against a pinned sha256 and
converted to ``vocab.json`` + ``merges.txt`` the way CLIP builds its vocabulary: the 256 byte
symbols, the same with ``</w>``, the first 48,894 merges in order, then ``<|startoftext|>`` and
``<|endoftext|>``. Both land in ``$PDM_LIGHTNING_CACHE/clip_bpe`` (default
``~/.cache/pdm_lightning/clip_bpe``), so tests and presets never need the network after the first
fetch (``make install`` does it). Without PyPI, point ``$PDM_LIGHTNING_CLIP_BPE`` (or ``--source``)
at a copy of the ``.gz``, its decompressed ``.txt`` or the downloaded wheel.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from pdm_lightning.core.atomic import staged_directory, write_bytes_atomically
from pdm_lightning.core.locks import file_lock

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# The wheel that carries the file; any release does, this one is pinned so the fetch is reproducible.
OPEN_CLIP_VERSION = "3.3.0"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed text: a copy re-compressed elsewhere (other gzip header) still matches.
VOCAB_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
SOURCE_ENV = "PDM_LIGHTNING_CLIP_BPE"
CACHE_ENV = "PDM_LIGHTNING_CACHE"
CACHE_SUBFOLDER = "clip_bpe"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's vocabulary budget: 49,152 BPE entries less the 256 single bytes and the 2 special tokens
# are merges; with the bytes doubled by </w> and the specials that is 49,408 tokens.
MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + MERGE_COUNT + 2
MODEL_MAX_LENGTH = 77
# The files a tokenizer folder gets: the fast tokenizer's (transformers 5) and the slow one's (4.x).
VOCAB_FILES = ("vocab.json", "merges.txt")


class ClipVocabularyError(RuntimeError):
    """CLIP's vocabulary could not be had: names the source tried and the fix."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte mapped to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def default_cache_dir() -> Path:
    """``$PDM_LIGHTNING_CACHE/clip_bpe``, else ``$XDG_CACHE_HOME/pdm_lightning/clip_bpe`` (``~/.cache`` by default)."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) / CACHE_SUBFOLDER
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "pdm_lightning" / CACHE_SUBFOLDER


def _checked_text(text: bytes, origin: str) -> bytes:
    digest = hashlib.sha256(text).hexdigest()
    if digest != VOCAB_TEXT_SHA256:
        raise ClipVocabularyError(
            f"{origin} is not CLIP's BPE vocabulary (sha256 of its text {digest[:16]}..., expected "
            f"{VOCAB_TEXT_SHA256[:16]}...). Point ${SOURCE_ENV} at {VOCAB_GZ_NAME} from an open_clip_torch wheel."
        )
    return text


def read_vocabulary(source: str | os.PathLike) -> tuple[bytes, bytes]:
    """(gzip bytes, checked text) from an open_clip_torch wheel, the ``.gz`` or its decompressed text."""
    path = Path(source)
    if not path.is_file():
        raise ClipVocabularyError(f"{path} does not exist: point ${SOURCE_ENV} (or --source) at {VOCAB_GZ_NAME} or an open_clip_torch wheel.")
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise ClipVocabularyError(f"{path} has no {WHEEL_MEMBER}: use an open_clip_torch wheel (or the .gz itself).")
            data = wheel.read(WHEEL_MEMBER)
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            return data, _checked_text(gzip.decompress(data), str(path))
        except (OSError, EOFError) as error:
            raise ClipVocabularyError(f"{path}: damaged gzip data ({error}). Fetch it again.") from error
    return gzip.compress(data, mtime=0), _checked_text(data, str(path))


def download_wheel(folder: Path) -> Path:
    """``pip download``s the pinned open_clip_torch wheel (no dependencies, nothing installed) into ``folder``."""
    requirement = f"open_clip_torch=={OPEN_CLIP_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", requirement, "-d", str(folder)]
    print(f"Fetching CLIP's BPE vocabulary from PyPI ({requirement} wheel, {VOCAB_GZ_NAME} only)", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("open_clip_torch-*.whl"))
    if result.returncode != 0 or not wheels:
        last_lines = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ClipVocabularyError(
            f"Could not download {requirement} with pip ({last_lines or 'no wheel'}). Without PyPI, copy "
            f"{VOCAB_GZ_NAME} (it is in every open_clip_torch wheel, under open_clip/) or the wheel to this "
            f"machine and set ${SOURCE_ENV} to its path (or pass --source)."
        )
    return wheels[-1]


def bpe_files(text: str) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merge list from the text of ``bpe_simple_vocab_16e6.txt``."""
    lines = text.split("\n")
    merges = lines[1 : 1 + MERGE_COUNT]  # line 0 is the "#version" header
    if len(merges) != MERGE_COUNT or any(len(m.split()) != 2 for m in merges):
        raise ClipVocabularyError(f"Expected {MERGE_COUNT} merge lines of two symbols each after the header.")
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ClipVocabularyError(f"The merges give {len(vocab)} distinct tokens, not CLIP's {VOCAB_SIZE}.")
    return vocab, merges


def write_vocabulary_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """``vocab.json`` + ``merges.txt`` as CLIP's Hugging Face tokenizers have them."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _obtain(source: str | os.PathLike | None) -> tuple[bytes, bytes]:
    source = source or os.environ.get(SOURCE_ENV)
    if source:
        return read_vocabulary(source)
    with tempfile.TemporaryDirectory(prefix="pdm_lightning-open_clip-") as tmp:
        return read_vocabulary(download_wheel(Path(tmp)))


def vocabulary_gz(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checked ``bpe_simple_vocab_16e6.txt.gz`` in the cache, obtained on first use.

    ``source`` (else ``$PDM_LIGHTNING_CLIP_BPE``) is a local wheel, ``.gz`` or ``.txt``; without
    either the pinned open_clip_torch wheel is downloaded from PyPI. Concurrent callers wait on a
    lock file, so one fetches and the others reuse its file.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / VOCAB_GZ_NAME
    with file_lock(folder / ".lock"):
        if target.is_file():
            try:
                read_vocabulary(target)
                return target
            except ClipVocabularyError as error:
                print(f"Replacing the damaged cached vocabulary: {error}", file=sys.stderr)
        compressed, _ = _obtain(source)
        write_bytes_atomically(target, compressed)
    return target


def tokenizer_dir(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached CLIP tokenizer folder (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json; 77 tokens)."""
    from transformers import CLIPTokenizer

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / "tokenizer"
    gz = vocabulary_gz(source, folder)
    with file_lock(folder / ".lock"):
        if all((target / name).is_file() for name in (*VOCAB_FILES, "tokenizer_config.json")):
            return target
        vocab, merges = bpe_files(gzip.decompress(gz.read_bytes()).decode("utf-8"))
        with staged_directory(target) as staging:
            write_vocabulary_files(staging, vocab, merges)
            CLIPTokenizer.from_pretrained(staging, model_max_length=MODEL_MAX_LENGTH).save_pretrained(staging)
    return target


def load_clip_tokenizer(
    pad_token: str | None = None, source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> CLIPTokenizer:
    """CLIP's tokenizer (77 tokens). SD 1.x pads with ``<|endoftext|>`` (the default), SD 2.x with ``"!"``."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(tokenizer_dir(source, cache_dir), model_max_length=MODEL_MAX_LENGTH, **extra)


def add_vocabulary_files(tokenizer_folder: Path, cache_dir: str | os.PathLike | None = None) -> None:
    """Copies vocab.json + merges.txt beside a saved tokenizer: transformers 5 writes only tokenizer.json,
    transformers 4's slow CLIPTokenizer (and other tools) read these two."""
    source = tokenizer_dir(cache_dir=cache_dir)
    for name in VOCAB_FILES:
        shutil.copyfile(source / name, tokenizer_folder / name)


def save_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str | None = None, source: str | os.PathLike | None = None) -> Path:
    """Writes a complete CLIP tokenizer folder to ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    tokenizer = load_clip_tokenizer(pad_token, source)
    with staged_directory(out_dir) as staging:
        tokenizer.save_pretrained(staging)
        add_vocabulary_files(staging)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="also write a tokenizer folder here")
    parser.add_argument("--source", help=f"local open_clip_torch wheel, {VOCAB_GZ_NAME} or its .txt (else ${SOURCE_ENV}, else PyPI)")
    parser.add_argument("--pad_token", help='padding token of the written folder (SD 2.x uses "!")')
    args = parser.parse_args(argv)
    try:
        cached = tokenizer_dir(args.source)
        print(f"CLIP tokenizer (cached): {cached}")
        if args.out_dir:
            print(f"CLIP tokenizer: {save_clip_tokenizer(args.out_dir, args.pad_token, args.source)}")
    except ClipVocabularyError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
