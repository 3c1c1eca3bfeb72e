"""The teacher query bank on disk: one safetensors file per instance image.

Files are named after the photo's file stem (``<stem>.safetensors``) in a folder the user names
(``python -m pdm_lightning.features --out``, ``--model.pdm.features_dir``), and after the sha256 of
the photo's bytes (``<sha256>.safetensors``) in the cache: there, two subjects whose photos share
file names (DreamBench's 00.jpg, 01.jpg, ...) keep their own files side by side.

Each file holds ``timesteps`` [n_t] (ascending; 0..999 in faithful mode, so row = timestep), and
``queries`` [n_t, tokens, dim] (mode ``bank``) and/or ``latents`` [n_t, 4, h, w] (mode ``latents``:
the latents fed to the UNet at each recorded reconstruction call, for on-the-fly targets), each with
its crc32 checksums (``<name>_crc32``, one per row; pdm.integrity), and every setting that determines
it in the header's metadata. Readers memory-map the files, read only the rows a training step needs,
and check each row against its checksum.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from pdm_lightning.core.conditioning import PromptEmbeddings, encode_prompts, tokenize
from pdm_lightning.core.dtypes import DTYPES
from pdm_lightning.data.crops import centre_crop_time_ids, load_training_image
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER
from pdm_lightning.pdm.fingerprint import file_sha256, model_fingerprint, vae_fingerprint
from pdm_lightning.pdm.integrity import (
    BankDamagedError,
    ChecksummedSafetensors,
    check_row,
    checksum,
    checksum_name,
    damage_message,
    find_damage,
    find_damaged,
    is_checksum,
)
from pdm_lightning.pdm.inversion import invert_and_reconstruct, trajectory_timesteps
from pdm_lightning.pdm.query_unet import QueryUNet, choose_mode
from pdm_lightning.pdm.storage import read_metadata, remove_dead_partials

_log = logging.getLogger(__name__)

# Bumped whenever the procedure or the file layout changes, so old caches become misses.
# 2: crc32 checksums of every row (pdm.integrity).
BANK_FORMAT = "pdm-bank-2"
# The bank is stored in float16 or float32 (bfloat16 would lose the queries' precision for nothing).
STORAGE_DTYPES = {name: DTYPES[name] for name in ("float16", "float32")}
MODES = ("bank", "latents", "both")
# Per-image keys of the metadata (the rest comes from BankSettings and the model fingerprint).
IMAGE_KEYS = ("image_name", "image_sha256")
# The photo's name is informative only: the same bytes under another name make the same file.
INFORMATIVE_KEYS = ("image_name",)
# How the files of a folder are named: after the photo's file stem (folders the user names) or its
# content (the cache, shared by every subject).
Naming = Literal["stem", "content"]
# In the cache root: model-file hashes remembered by (path, size, mtime), so big weights are hashed once.
MODEL_HASHES_FILE = "file-hashes.json"


@dataclass(frozen=True)
class BankSettings:
    """Everything besides the images that determines a bank.

    Args:
        pretrained_model_name_or_path: the frozen base model (local diffusers folder or hub id).
        class_prompt: the prompt the inversion is conditioned on (the method's: the class prompt).
        resolution: training resolution; each image's center crop at this size is inverted.
        revision / variant: of the base model.
        layer: module path of the captured query projection inside the UNet (a concrete path: the
            rule's layer is resolved by ``PDMSettings.bank_settings``).
        inversion_steps: None (faithful: 999 steps, a row for every t = 0..999) or fewer.
        dtype: storage dtype of ``queries`` (latents are always stored in float32).
        mode: ``bank`` (queries), ``latents`` (latents only, for on-the-fly targets) or ``both``.
        compute_dtype: dtype the frozen UNet, VAE and text encoders run in during extraction (an SDXL VAE
            that asks for ``force_upcast`` stays float32 when this is float16, as in diffusers' pipelines).
        vae_name_or_path: a VAE replacing the base model's (``--model.vae_name_or_path``): it makes the
            clean latents, so its fingerprint joins the cache key (only when set: keys without it are unchanged).
    """

    pretrained_model_name_or_path: str
    class_prompt: str
    resolution: int
    revision: str | None = None
    variant: str | None = None
    layer: str = DEFAULT_PDM_LAYER
    inversion_steps: int | None = None
    dtype: Literal["float16", "float32"] = "float16"
    mode: Literal["bank", "latents", "both"] = "bank"
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    vae_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}.")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(DTYPES)}, got {self.compute_dtype!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE's factor), got {self.resolution}.")
        if self.inversion_steps is not None and self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be at least 1 (or None for the faithful 999), got {self.inversion_steps}.")

    @property
    def stores_queries(self) -> bool:
        return self.mode in ("bank", "both")

    @property
    def stores_latents(self) -> bool:
        return self.mode in ("latents", "both")

    def metadata(self, model: str, vae: str | None = None) -> dict[str, str]:
        """The settings as the strings stored in (and compared against) each file's header.

        ``model`` is the model fingerprint and ``vae`` the replacement VAE's (``fingerprinted_metadata``
        computes both); the paths themselves are informative only (a folder can move without changing
        the bank) and are not compared.
        """
        values = asdict(self)
        for informative in ("pretrained_model_name_or_path", "revision", "variant", "vae_name_or_path"):
            values.pop(informative)
        values["inversion_steps"] = "faithful" if self.inversion_steps is None else str(self.inversion_steps)
        if (vae is None) != (self.vae_name_or_path is None):
            raise ValueError("Give the replacement VAE's fingerprint exactly when vae_name_or_path is set.")
        return {
            "format": BANK_FORMAT,
            "model": model,
            **({"vae": vae} if vae is not None else {}),
            "crop": "center",
            **{key: str(value) for key, value in values.items()},
        }

    def key(self, model: str, vae: str | None = None) -> str:
        """A short hash of the settings: the cache folder's name."""
        return metadata_key(self.metadata(model, vae))


def metadata_key(metadata: dict[str, str]) -> str:
    """A short hash of a bank's settings metadata: the cache folder's name."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(metadata.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def fingerprinted_metadata(settings: BankSettings, memo_file: Path | None = None) -> dict[str, str]:
    """``settings.metadata`` with the fingerprints of the base model (and of the replacement VAE) computed."""
    model = model_fingerprint(settings.pretrained_model_name_or_path, settings.revision, settings.variant, memo_file)
    vae = vae_fingerprint(settings.vae_name_or_path, memo_file) if settings.vae_name_or_path is not None else None
    return settings.metadata(model, vae)


def bank_file(folder: Path, image: Path, naming: Naming = "stem") -> Path:
    """The bank file of ``image`` in ``folder``: ``<stem>.safetensors``, or ``<sha256 of its bytes>.safetensors``."""
    if naming == "content":
        return folder / f"{file_sha256(image)}.safetensors"
    if naming != "stem":
        raise ValueError(f"naming must be 'stem' or 'content', got {naming!r}.")
    return folder / f"{image.stem}.safetensors"


def check_distinct_stems(images: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise InputDataError(
                f"{image} and {seen[image.stem]} share the name {image.stem!r}, but the bank keeps one "
                f"{image.stem}.safetensors per image: rename one of them."
            )
        seen[image.stem] = image


def image_metadata(image: Path) -> dict[str, str]:
    return {"image_name": image.name, "image_sha256": file_sha256(image)}


def metadata_differences(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Human-readable ``key: found != expected`` for every expected key a file disagrees on (names are not compared)."""
    return [
        f"{key}: {found.get(key, '(missing)')!r} != {value!r}"
        for key, value in expected.items()
        if key not in INFORMATIVE_KEYS and found.get(key) != value
    ]


@dataclass
class BuildReport:
    """What ``build_bank`` did: the files of this shard (rank ``rank`` of ``world_size``), and how many it computed versus found."""

    folder: Path
    files: list[Path]
    computed: int
    reused: int
    unet_calls: int
    rank: int = 0
    world_size: int = 1


def build_bank(
    settings: BankSettings,
    images: Sequence[Path],
    folder: str | os.PathLike,
    *,
    on_mismatch: Literal["error", "replace"] = "error",
    naming: Naming = "stem",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    components: object | None = None,
    memo_file: Path | None = None,
    compile_unet: bool = False,
) -> BuildReport:
    """Writes the bank file of every image of this shard into ``folder``, skipping finished ones.

    Idempotent and resumable per image: a file whose metadata matches and whose every row passes
    its checksum is reused and never rewritten; an interrupted image is recomputed from scratch. A
    file with other settings, or damaged, is an error (``on_mismatch="error"``, for folders the user
    named: they are never rewritten) or is deleted and rebuilt with one logged line saying why
    (``"replace"``, for the cache). ``naming`` is how files are named (``bank_file``). Rank ``r`` of
    ``world_size`` handles images r, r + W, ...; the caller waits for all ranks (a barrier) before
    opening the bank. The models are loaded only when there is work (``components``: an already
    loaded StableDiffusionComponents). ``compile_unet``: run the UNet through ``torch.compile``
    (pdm.query_unet; rows then match the eager ones to float rounding, under the same cache key).
    """
    images = [Path(p) for p in images]
    if not images:
        raise InputDataError("The PDM bank needs at least one instance image; the instance folder is empty.")
    if naming == "stem":
        check_distinct_stems(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(folder)
    base = fingerprinted_metadata(settings, memo_file)
    mine = images[rank::world_size]
    files = [bank_file(folder, image, naming) for image in mine]
    # The same photo twice (content naming) is one file, built once.
    jobs = list({target: (image, target, {**base, **image_metadata(image)}) for image, target in zip(mine, files)}.values())
    todo = _jobs_to_build(jobs, on_mismatch)
    shard = {"rank": rank, "world_size": world_size}
    if not todo:
        return BuildReport(folder, files, computed=0, reused=len(mine), unet_calls=0, **shard)

    extractor = BankExtractor(settings, components, device, compile_unet=compile_unet)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    who = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    # Released also after an error or interrupt: the capture hook would otherwise stay on the UNet.
    try:
        with tqdm(
            total=len(batches) * extractor.calls_per_batch, desc=f"PDM teacher bank{who}", unit="call",
            disable=not progress, dynamic_ncols=True,
        ) as bar:
            done = 0
            for batch in batches:
                first, last = done + 1, done + len(batch)
                bar.set_description(f"PDM teacher bank{who}: photo {first}{f'-{last}' if last > first else ''}/{len(todo)}")
                done = last
                # Another process may have finished some of these meanwhile.
                batch = [job for job in batch if not _file_matches(job[1], job[2])]
                if batch:
                    extractor.extract(batch, on_call=bar.update)
                else:
                    bar.update(extractor.calls_per_batch)
    finally:
        extractor.release()
    return BuildReport(
        folder, files, computed=len(todo), reused=len(mine) - len(todo), unet_calls=extractor.unet_calls, **shard
    )


# (photo, its bank file, the metadata the file must hold)
BankJob = tuple[Path, Path, dict[str, str]]


def _jobs_to_build(jobs: list[BankJob], on_mismatch: Literal["error", "replace"]) -> list[BankJob]:
    """The jobs whose file is missing, or (cache only) was built otherwise or is damaged and was deleted."""
    problems = {target: _metadata_problem(target, expected) for _, target, expected in jobs if target.exists()}
    # Every row of every file that looks right is read back and checked (in parallel): damaged data
    # with an intact header would otherwise be trained on.
    looks_right = [target for target, problem in problems.items() if problem is None]
    problems.update({path: f"is damaged ({problem})" for path, problem in find_damaged(looks_right).items()})
    todo = []
    for job in jobs:
        target = job[1]
        if target in problems and problems[target] is None:
            continue
        if target in problems:
            _refuse_or_remove(target, problems[target], on_mismatch)
        todo.append(job)
    return todo


def _metadata_problem(path: Path, expected: dict[str, str]) -> str | None:
    found = _safe_metadata(path)
    if not found:  # safetensors refuses it: say what is wrong (e.g. cut short by a full disk)
        return f"is damaged ({find_damage(path) or 'no readable safetensors header'})"
    differences = metadata_differences(found, expected)
    if differences:
        return f"was built with other settings or from another image ({'; '.join(differences)})"
    return None


def _refuse_or_remove(target: Path, problem: str, on_mismatch: Literal["error", "replace"]) -> None:
    """A user's folder is never rewritten: its bad file is an error. A cache file is deleted, saying why, in one line."""
    if on_mismatch == "error":
        raise InputDataError(f"{target} {problem}. Choose another output folder, or delete that file to rebuild it.")
    _log.warning("PDM bank: %s %s: rebuilding", target.name, problem)
    # Deleted now, so the finished rebuild is not mistaken for another process's (see extract).
    target.unlink(missing_ok=True)


def _file_matches(path: Path, expected: dict[str, str]) -> bool:
    """Whether ``path`` exists with the expected metadata (its data is checked by ``find_damaged``)."""
    return path.exists() and _metadata_problem(path, expected) is None


def _safe_metadata(path: Path) -> dict[str, str]:
    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - a missing or unreadable file has no settings
        return {}


@torch.no_grad()
def class_condition(tokenizers, text_encoders, prompt: str) -> PromptEmbeddings:  # noqa: ANN001
    """The conditioning of ``prompt`` as training encodes it (``core.conditioning``): the text encoder's
    output [1, 77, d] for SD; for SDXL (two tokenizers and encoders) both penultimate states side by side
    and the pooled embedding [1, d']. A single tokenizer and encoder may be given bare."""
    tokenizers = tuple(tokenizers) if isinstance(tokenizers, (tuple, list)) else (tokenizers,)
    text_encoders = tuple(text_encoders) if isinstance(text_encoders, (tuple, list)) else (text_encoders,)
    return encode_prompts(text_encoders, tokenize(tokenizers, [prompt]))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BankExtractor:
    """The frozen base model set up for extraction: runs the batched inversion and writes the files."""

    def __init__(
        self, settings: BankSettings, components: object | None, device: str | torch.device | None, compile_unet: bool = False
    ) -> None:
        from pdm_lightning.core.loading import load_components, vae_dtype

        self.settings = settings
        self.device = torch.device(device) if device is not None else default_device()
        self.compute_dtype = DTYPES[settings.compute_dtype]
        parts = components or load_components(
            settings.pretrained_model_name_or_path, settings.revision, settings.variant, settings.vae_name_or_path
        )
        self.vae = parts.vae
        self.sdxl = parts.text_encoder_2 is not None
        for model in (parts.unet, parts.vae, *parts.text_encoders):
            model.requires_grad_(False).eval().to(self.device)
            dtype = vae_dtype(parts.vae, parts.family, self.compute_dtype) if model is parts.vae else self.compute_dtype
            if model.dtype != dtype:  # casting to the same dtype only logs a diffusers warning
                model.to(dtype=dtype)
        scheduler = parts.noise_scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()
        self.trajectory = trajectory_timesteps(scheduler.config.num_train_timesteps, settings.inversion_steps)
        self.calls_per_batch = 2 * len(self.trajectory) - 1
        self.unet_calls = 0
        # Encoded once: every call of every batch is conditioned on the same class prompt.
        condition = class_condition(parts.tokenizers, parts.text_encoders, settings.class_prompt)
        self.unet = QueryUNet(parts.unet, settings.layer, condition, choose_mode(compile_unet, self.calls_per_batch))

    @torch.inference_mode()
    def extract(self, batch: list[BankJob], on_call=None) -> None:  # noqa: ANN001
        """Inverts and reconstructs one batch of images (one UNet call per step for all), writing rows as they come."""
        resolution = self.settings.resolution
        pixels = torch.stack([load_training_image(image, resolution, None) for image, _, _ in batch])
        latent_dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        clean = latent_dist.mode().float() * self.vae.config.scaling_factor
        # SDXL: each photo's size conditioning, that of the centre crop inverted here (and trained on in the PDM chunk).
        time_ids = (
            torch.stack([centre_crop_time_ids(image, resolution) for image, _, _ in batch]).to(self.device)
            if self.sdxl else None
        )
        writers: list[ChecksummedSafetensors] = []
        store_dtype = STORAGE_DTYPES[self.settings.dtype]
        n_rows = len(self.trajectory)

        def predict(latents: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.unet_calls += 1
            return self.unet(latents.to(self.compute_dtype), timestep, time_ids)

        def record(row: int, query: torch.Tensor, latents: torch.Tensor) -> None:
            if not writers:  # shapes are known at the first recorded call
                tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"timesteps": (torch.int64, (n_rows,))}
                if self.settings.stores_queries:
                    tensors["queries"] = (store_dtype, (n_rows, *query.shape[1:]))
                if self.settings.stores_latents:
                    tensors["latents"] = (torch.float32, (n_rows, *latents.shape[1:]))
                for _, target, metadata in batch:
                    writers.append(ChecksummedSafetensors(target, tensors, metadata))
            stored = {}
            if self.settings.stores_queries:
                stored["queries"] = query.to("cpu", store_dtype)
            if self.settings.stores_latents:
                stored["latents"] = latents.to("cpu", torch.float32)
            for name, values in stored.items():
                self._check_finite(name, values, batch, int(self.trajectory[row]))
                for index, writer in enumerate(writers):
                    writer.write(name, values[index], row=row)

        try:
            invert_and_reconstruct(
                predict, clean, self.alphas_cumprod, self.trajectory, record, self.prediction_type, on_call=on_call
            )
            for writer, (_, _, metadata) in zip(writers, batch):
                writer.write("timesteps", self.trajectory)
                # A finished file is never rewritten: if another process completed it meanwhile, keep that one.
                if _file_matches(writer.path, metadata):
                    writer.discard()
                else:
                    writer.commit()
        finally:
            for writer in writers:
                writer.discard()  # no-op after commit (the partial is gone)

    def _check_finite(self, name: str, values: torch.Tensor, batch: list[BankJob], timestep: int) -> None:
        """A NaN or inf in the bank would make every PDM loss that reads it NaN: stop before writing it."""
        finite = torch.isfinite(values.flatten(1)).all(dim=1)
        if bool(finite.all()):
            return
        image = batch[int((~finite).nonzero()[0])][0]
        if self.settings.compute_dtype == self.settings.dtype == "float32":
            fix = "the base model produces them in float32: check its weights"
        else:
            fix = "build the bank with float32 for both (--compute_dtype and --dtype; --model.pdm.compute_dtype and .dtype)"
        raise ValueError(
            f"The teacher's {name} of {image} at timestep {timestep} is not finite (NaN or inf) with compute_dtype "
            f"{self.settings.compute_dtype} and dtype {self.settings.dtype}: {fix}."
        )

    def release(self) -> None:
        """Frees the models' device memory before training starts."""
        self.unet.release()
        self.unet = self.vae = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def cache_folder(settings: BankSettings, cache_root: str | os.PathLike, memo_file: Path | None = None) -> Path:
    """The cache folder of ``settings``: ``<cache_root>/<settings key>``, one file per image inside."""
    return Path(cache_root) / metadata_key(fingerprinted_metadata(settings, memo_file))


def default_cache_root() -> Path:
    """``$PDM_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/pdm_lightning/pdm_bank`` (``~/.cache`` by default)."""
    if "PDM_LIGHTNING_CACHE" in os.environ:
        return Path(os.environ["PDM_LIGHTNING_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "pdm_lightning" / "pdm_bank"


def ensure_cached_bank(
    settings: BankSettings, images: Sequence[Path], cache_root: str | os.PathLike | None = None, **build_options: object
) -> BuildReport:
    """Builds (or reuses) the bank in the cache, one ``<sha256 of the photo>.safetensors`` per photo.

    Files are named by content, so subjects whose photos share file names never collide; a file
    with other settings, or damaged (a row failing its checksum), is rebuilt with one logged line.

    Local model folders are fingerprinted by their bytes once, then remembered by (path, size,
    mtime) in ``<cache_root>/file-hashes.json``. ``build_options`` go to ``build_bank``.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    memo = root / MODEL_HASHES_FILE
    return build_bank(
        settings, images, cache_folder(settings, root, memo), on_mismatch="replace", naming="content", memo_file=memo,
        **build_options,
    )


def cached_bank_folder(settings: BankSettings, cache_root: str | os.PathLike | None = None) -> Path:
    """Where ``ensure_cached_bank`` keeps the bank of ``settings`` (for the processes that only read it)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return cache_folder(settings, root, root / MODEL_HASHES_FILE)


class QueryBank:
    """Memory-mapped read access to the bank files of the instance images, in the dataset's image order.

    Only the requested rows (one image, one timestep each) are read from disk, and each is checked
    against its crc32 (pdm.integrity: about 1.5 ms for a 2.6 MB SD1.5 row): a damaged row is a
    BankDamagedError naming the file and row, never a wrong target. Nothing is kept on the device.
    Picklable (file handles are reopened lazily in each process).
    """

    def __init__(self, files: Sequence[Path]) -> None:
        if not files:
            raise ValueError("A QueryBank needs at least one file.")
        self.files = [Path(f) for f in files]
        self.metadata = [read_metadata(f) for f in self.files]
        self._handles: dict[int, object] = {}
        first = self._handle(0)
        self.timesteps = first.get_tensor("timesteps").long()
        keys = set(first.keys())
        self.has_queries, self.has_latents = "queries" in keys, "latents" in keys
        self.query_shape = tuple(first.get_slice("queries").get_shape()[1:]) if self.has_queries else None
        self.latent_shape = tuple(first.get_slice("latents").get_shape()[1:]) if self.has_latents else None
        for index in range(1, len(self.files)):
            self._check_consistent(index)
        # Per file, per tensor: the checksum of every row (a few KB per file).
        self._checksums = [self._load_checksums(index) for index in range(len(self.files))]
        # Faithful banks store every timestep 0..T-1: the row is the timestep itself.
        self._row_is_timestep = bool(torch.equal(self.timesteps, torch.arange(len(self.timesteps))))

    def _check_consistent(self, index: int) -> None:
        handle = self._handle(index)
        same = torch.equal(handle.get_tensor("timesteps").long(), self.timesteps) and set(handle.keys()) == set(
            self._handle(0).keys()
        )
        settings = {k: v for k, v in self.metadata[index].items() if k not in IMAGE_KEYS}
        first = {k: v for k, v in self.metadata[0].items() if k not in IMAGE_KEYS}
        if not same or settings != first:
            raise InputDataError(
                f"{self.files[index]} and {self.files[0]} were built with different settings "
                f"({'; '.join(metadata_differences(settings, first)) or 'timesteps or contents differ'}): "
                "rebuild the bank folder with one command."
            )

    def _load_checksums(self, index: int) -> dict[str, torch.Tensor]:
        """The row checksums of file ``index``; its timesteps are checked here (they are read whole, once)."""
        handle, path = self._handle(index), self.files[index]
        keys = set(handle.keys())  # safetensors' handle: a method, not a dict
        names = [name for name in keys if not is_checksum(name)]
        missing = sorted(name for name in names if checksum_name(name) not in keys)
        if missing:
            raise InputDataError(
                f"{path} has no checksums for {', '.join(missing)}: it was written before bank files carried "
                "checksums. Delete it and run again (the cache rebuilds it; `python -m pdm_lightning.features` "
                "rebuilds a features_dir)."
            )
        sums = {name: handle.get_tensor(checksum_name(name)) for name in names}
        if checksum(handle.get_tensor("timesteps")) != int(sums["timesteps"][0]):
            raise BankDamagedError(damage_message(path, "its timesteps fail their checksum"))
        return sums

    def _read_row(self, name: str, index: int, row: int) -> torch.Tensor:
        data = self._handle(index).get_slice(name)[row]
        check_row(self.files[index], name, row, data, int(self._checksums[index][name][row]), int(self.timesteps[row]))
        return data

    def _handle(self, index: int):  # noqa: ANN202 - safetensors' safe_open handle
        if index not in self._handles:
            self._handles[index] = safe_open(str(self.files[index]), framework="pt")
        return self._handles[index]

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.files)

    @property
    def settings(self) -> dict[str, str]:
        return {k: v for k, v in self.metadata[0].items() if k not in IMAGE_KEYS}

    def rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Row index of each timestep; an error for a timestep the trajectory never visited."""
        timesteps = torch.as_tensor(timesteps).long().cpu()
        if self._row_is_timestep:
            rows = timesteps
            valid = (rows >= 0) & (rows < len(self.timesteps))
        else:
            rows = torch.searchsorted(self.timesteps, timesteps).clamp(max=len(self.timesteps) - 1)
            valid = self.timesteps[rows] == timesteps
        if not bool(valid.all()):
            bad = timesteps[~valid].tolist()
            raise ValueError(
                f"Timesteps {bad} are not in the bank's trajectory ({len(self.timesteps)} timesteps): draw PDM "
                "timesteps from bank.timesteps (never interpolated)."
            )
        return rows

    def _gather(self, name: str, image_indices: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        image_indices = torch.as_tensor(image_indices).long().cpu().reshape(-1)
        rows = self.rows(timesteps).reshape(-1)
        if len(image_indices) != len(rows):
            raise ValueError(f"{len(image_indices)} image indices but {len(rows)} timesteps.")
        if not getattr(self, f"has_{name}"):
            raise ValueError(f"This bank holds no {name} (mode {self.settings.get('mode')}); rebuild it with mode 'both'.")
        return torch.stack([self._read_row(name, int(i) % len(self.files), int(r)) for i, r in zip(image_indices, rows)])

    def queries(self, image_indices: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Teacher queries [B, tokens, dim] on the CPU in the stored dtype (index modulo the image count)."""
        return self._gather("queries", image_indices, timesteps)

    def latents(self, image_indices: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Reconstruction latents [B, 4, h, w] (float32, CPU) fed to the UNet at these timesteps."""
        return self._gather("latents", image_indices, timesteps)

    def bytes_per_image(self) -> int:
        return math.ceil(sum(f.stat().st_size for f in self.files) / len(self.files))


def open_bank(
    folder: str | os.PathLike,
    images: Sequence[Path],
    settings: BankSettings | None = None,
    memo_file: Path | None = None,
    *,
    naming: Naming = "stem",
    verify: bool = False,
) -> QueryBank:
    """The bank of ``images`` in ``folder`` (one file each, named as ``bank_file``), checked before training.

    Each file must exist and come from the same image bytes; with ``settings`` its metadata must
    match them too; with ``verify`` every row must pass its checksum (the whole folder is read).
    Errors name the file and say how to rebuild; the folder is never changed.
    """
    folder = Path(folder)
    images = [Path(p) for p in images]
    if naming == "stem":
        check_distinct_stems(images)
    files = [bank_file(folder, image, naming) for image in images]
    missing = [
        path.name if naming == "stem" else f"{path.name} (of {image})"
        for image, path in zip(images, files)
        if not path.is_file()
    ]
    if missing:
        raise InputDataError(
            f"The PDM bank folder {folder} lacks {', '.join(missing)}: build it with `python -m pdm_lightning.features "
            f"... --out {folder}` for the same instance images, or let training build its cache."
        )
    base = None
    if settings is not None:
        base = fingerprinted_metadata(settings, memo_file)
    # A "both" bank serves either teacher: the mode must only store what the run reads.
    wanted_mode = base.pop("mode") if base is not None else None
    for image, path in zip(images, files):
        expected = {**(base or {}), "image_sha256": file_sha256(image)}
        found = read_metadata(path)
        differences = metadata_differences(found, expected)
        if wanted_mode is not None and found.get("mode") not in (wanted_mode, "both"):
            differences.append(f"mode: {found.get('mode', '(missing)')!r} != {wanted_mode!r} (or 'both')")
        if differences:
            raise InputDataError(
                f"{path} does not match this run ({'; '.join(differences)}): rebuild it with the run's settings "
                "(python -m pdm_lightning.features) or point training at the right folder."
            )
    if verify:
        damaged = find_damaged(list(dict.fromkeys(files)))
        if damaged:
            path, problem = next(iter(damaged.items()))
            raise BankDamagedError(damage_message(path, problem))
    return QueryBank(files)
