"""Preparation split across ranks (pdm_lightning.prepare), in one process: shares, the report, folders not shared.

The two-process run through train.py (gloo) is tests/test_ddp.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import folder_snapshot
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.teacher import PDMTeacher
from pdm_lightning.prepare import RunInputs, build_inputs, prepare_inputs, prepare_inputs_distributed
from pdm_lightning.prepare.class_images import ClassImageGeneration

CPU = torch.device("cpu")


def run_inputs(instance_dir: Path, class_dir: Path) -> RunInputs:
    return RunInputs(
        instance_data_dir=str(instance_dir), resolution=64, with_prior_preservation=True, class_data_dir=str(class_dir),
        class_prompt="a photo of dog", num_class_images=4,
        class_generation=ClassImageGeneration(num_inference_steps=2, sample_batch_size=2),
    )


def teacher(model: Path, cache: Path) -> PDMTeacher:
    return PDMTeacher(PDMSettings(inversion_steps=2, batch_size=1, cache_dir=str(cache)), ModelSource(str(model)))


def test_each_rank_makes_its_share(tiny_model_dir: Path, instance_dir: Path, tmp_path: Path) -> None:
    inputs = run_inputs(instance_dir, tmp_path / "class")
    shares = [build_inputs(inputs, ModelSource(str(tiny_model_dir)), teacher(tiny_model_dir, tmp_path / "cache"), CPU, rank, 2)
              for rank in (1, 0)]
    assert [len(share.class_images) for share in shares] == [2, 2]
    assert [(share.bank.computed, share.bank.rank, share.bank.world_size) for share in shares] == [(2, 1, 2), (3, 0, 2)]


def test_a_folder_the_ranks_do_not_share_is_completed_by_each_rank(
    tiny_model_dir: Path, instance_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rank that finds the other ranks' files missing after the barrier (nodes with their own disks) makes them
    itself: the folders end up as one process makes them."""
    source = ModelSource(str(tiny_model_dir))
    prepare_inputs(run_inputs(instance_dir, tmp_path / "one" / "class"), source, teacher(tiny_model_dir, tmp_path / "one" / "cache"), CPU)

    caplog.set_level(logging.INFO)
    inputs = run_inputs(instance_dir, tmp_path / "alone" / "class")
    with pytest.warns(UserWarning, match="do not share that folder"):
        # Rank 0 of 2 without a process group: no other rank ever writes here.
        prepare_inputs_distributed(inputs, source, teacher(tiny_model_dir, tmp_path / "alone" / "cache"), CPU, 0, 2)
    assert folder_snapshot(tmp_path / "alone") == folder_snapshot(tmp_path / "one")
    assert "PDM teacher bank: 3 image(s) built, 0 reused" in caplog.text  # the figures of its own share
