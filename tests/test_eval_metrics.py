"""The DreamBench metrics, prompt handling and report files against hand computations (no model)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.evaluation.metrics import (
    all_pairs_distance_mean,
    all_pairs_mean,
    cosine_similarity_matrix,
    diversity,
    matched_pairs_mean,
    subject_metrics,
    upper_triangle_mean,
    within_group_distance_mean,
)
from pdm_lightning.evaluation.prompts import (
    BUNDLED_PROMPTS_FILE,
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    evenly_spaced,
    parse_prompts_and_classes,
    split_identifier_and_class,
)
from pdm_lightning.evaluation.report import write_csv_report, write_subject_table
from pdm_lightning.evaluation.scoring import undefined_metric_reasons
from pdm_lightning.evaluation.settings import EvaluationSettings, build_plan
from pdm_lightning.generation.prompts import fill_prompt

S2 = math.sqrt(2)

# Fixed 2-D embeddings: unit directions whose cosines are easy to write down.
GEN = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 4.0], [-1.0, 0.0]])
REAL = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
PROMPT_OF = [0, 0, 0, 1, 1]


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_cosine_matrix_and_all_pairs_mean() -> None:
    expected = [[cos(g, r) for r in REAL.tolist()] for g in GEN.tolist()]
    assert torch.allclose(cosine_similarity_matrix(GEN, REAL), torch.tensor(expected, dtype=torch.float64))
    # By hand: rows (1,0),(0,1),(1,1)/sqrt2,(.6,.8),(-1,0) against (1,0) and (.6,.8).
    by_hand = [1, 0.6, 0, 0.8, 1 / S2, 1.4 / S2, 0.6, 1.0, -1, -0.6]
    assert all_pairs_mean(GEN, REAL) == pytest.approx(sum(by_hand) / 10)


def test_clip_t_pairs_each_image_with_its_own_prompt() -> None:
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[PROMPT_OF]
    by_hand = [0, 1, 1 / S2, 0.6, -1]
    assert matched_pairs_mean(GEN, texts) == pytest.approx(sum(by_hand) / 5)
    with pytest.raises(ValueError):
        matched_pairs_mean(GEN, texts[:2])


def test_diversity_is_the_mean_over_prompts_of_upper_triangle_means() -> None:
    # Prompt 0: pairs (0,1)=0, (0,2)=1/sqrt2, (1,2)=1/sqrt2 -> mean sqrt2/3. Prompt 1: (3,4) = -0.6.
    prompt0 = (0 + 2 / S2) / 3
    assert diversity(GEN, PROMPT_OF) == pytest.approx((prompt0 - 0.6) / 2)
    # Not the pooled mean over the 4 pairs, and not the full matrix with its diagonal of ones.
    assert diversity(GEN, PROMPT_OF) != pytest.approx((2 / S2 - 0.6) / 4)
    assert upper_triangle_mean(torch.eye(1)) is None
    assert diversity(GEN[:2], [0, 1]) is None  # one image per prompt: undefined, not 0


def test_pres_and_subject_metrics_together() -> None:
    class_images = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[PROMPT_OF]
    metrics = subject_metrics(GEN, GEN * 2, texts, PROMPT_OF, REAL, REAL, class_images)
    assert metrics["pres"] == pytest.approx((0 + 0.8 + 0.6 + 1.0) / 4)
    assert metrics["dino_i"] == pytest.approx(metrics["clip_i"])  # scale does not change cosines
    assert metrics["clip_t"] == pytest.approx((0 + 1 + 1 / S2 + 0.6 - 1) / 5)
    assert subject_metrics(GEN, GEN, texts, PROMPT_OF, REAL, REAL, None)["pres"] is None


def test_lpips_style_distance_means() -> None:
    images = torch.tensor([0.0, 1.0, 3.0, 10.0, 20.0]).view(5, 1, 1, 1)
    real = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)

    def absolute(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().flatten()

    pairs = [abs(g - r) for g in (0, 1, 3, 10, 20) for r in (0, 2)]
    assert all_pairs_distance_mean(images, real, absolute, chunk=3) == pytest.approx(sum(pairs) / 10)
    # Prompt 0: |0-1|, |0-3|, |1-3| -> 2; prompt 1: |10-20| = 10 -> (2 + 10) / 2.
    assert within_group_distance_mean(images, PROMPT_OF, absolute) == pytest.approx(6.0)
    assert within_group_distance_mean(images[:2], [0, 1], absolute) is None


def test_prompts_file_matches_the_bundled_lists_and_classes() -> None:
    parsed = parse_prompts_and_classes(BUNDLED_PROMPTS_FILE)
    assert parsed.object_prompts == OBJECT_PROMPTS and parsed.live_prompts == LIVE_PROMPTS
    # DreamBench's lists: 25 prompts each, 10 shared recontextualizations first and 5 property changes last.
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25 and OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10]
    assert OBJECT_PROMPTS[0] == "a {0} {1} in the jungle" and OBJECT_PROMPTS[10] == "a {0} {1} with a wheat field in the background"
    assert OBJECT_PROMPTS[-5:] == LIVE_PROMPTS[-5:] == ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
    assert len(parsed.classes) == 30 and parsed.classes["bear_plushie"] == "stuffed animal"
    assert parsed.templates_for("dog") == LIVE_PROMPTS and parsed.templates_for("backpack") == OBJECT_PROMPTS
    assert fill_prompt(LIVE_PROMPTS[10], "sks", "dog") == "a sks dog wearing a red hat"


def test_bad_prompts_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "prompts.txt"
    bad.write_text("nothing here\n")
    with pytest.raises(InputDataError, match="prompts.txt"):
        parse_prompts_and_classes(bad)


def test_identifier_and_class_from_the_training_prompts() -> None:
    assert split_identifier_and_class("a photo of sks dog", "a photo of dog") == ("sks", "dog")
    assert split_identifier_and_class("a photo of sks stuffed animal", "a photo of stuffed animal") == ("sks", "stuffed animal")
    with pytest.raises(InputDataError, match="identifier"):
        split_identifier_and_class("a photo of dog", "a photo of dog")
    with pytest.raises(InputDataError):
        split_identifier_and_class("a photo of sks dog", None)


def test_plan_seeds_prompts_and_pres_requests() -> None:
    settings = EvaluationSettings(max_prompts=3, num_images_per_prompt=2, pres_num_images=2)
    plan = build_plan(settings, "a photo of sks cat", "a photo of cat")
    assert plan.prompts == ["a sks cat in the jungle", "a sks cat wearing a rainbow scarf", "a cube shaped sks cat"]
    subject = [j for j in plan.jobs if j.kind == "subject"]
    cls = [j for j in plan.jobs if j.kind == "class"]
    assert len(subject) == 6 and [j.prompt for j in cls] == ["a cat", "a cat"]
    # Image k has the same seed for every prompt and for the class prompt; different k, different seed.
    assert {j.seed for j in subject if j.image_index == 0} == {cls[0].seed}
    assert cls[0].seed != cls[1].seed
    custom = build_plan(EvaluationSettings(prompt_set="custom", prompts=["{0} {1} at night", "a plain prompt"]), "a photo of sks cat", "a photo of cat")
    assert custom.prompts == ["sks cat at night", "a plain prompt"]
    assert evenly_spaced(list("abcde"), 2) == ["a", "e"]


def test_csv_report_and_subject_table(tmp_path: Path) -> None:
    per_prompt = [{"prompt": "a sks dog", "dino_i": 0.5, "clip_t": 0.25}, {"prompt": "a red sks dog", "dino_i": 0.7, "clip_t": 0.35}]
    write_csv_report(tmp_path / "m.csv", per_prompt, {"dino_i": 0.6, "clip_t": 0.3, "pres": 0.4, "lpips_i": None})
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows[0] == ["prompt", "dino_i", "clip_t", "pres"]  # LPIPS left out, not written as 0
    assert rows[-1] == ["all", "0.600000", "0.300000", "0.400000"] and rows[1][3] == ""

    paths = write_subject_table(tmp_path, {"dog": {"dino_i": 0.5, "clip_t": 0.2}, "cat": {"dino_i": 0.7, "clip_t": 0.4, "pres": 0.1}})
    table = list(csv.reader(paths[0].open()))
    assert table[0] == ["subject", "dino_i", "clip_t", "pres"]
    assert table[-1] == ["mean", "0.600000", "0.300000", "0.100000"]
    markdown = paths[1].read_text()
    # Each metric's column says which way is better.
    assert "| subject | DINO-I ↑ | CLIP-T ↑ | PRES ↓ |" in markdown and "| **mean** | 0.6000 | 0.3000 | 0.1000 |" in markdown
    assert "↑ higher is better, ↓ lower is better" in markdown
    with Image.open(paths[2]) as plot:
        assert plot.format == "PNG" and plot.width > 300
        assert len(set(plot.convert("RGB").getdata())) > 3  # bars drawn, not a blank canvas


@pytest.mark.parametrize("bad", [
    {"num_images_per_prompt": 0}, {"num_inference_steps": 0}, {"batch_size": 0}, {"pres_num_images": -1},
    {"max_prompts": 0}, {"scheduler": "not_a_sampler"}, {"prompt_set": "custom"}, {"resolution": 60},
])
def test_bad_evaluation_settings_fail_when_built(bad: dict) -> None:
    option = next(iter(bad)) if "prompt_set" not in bad else "prompts"
    with pytest.raises(InputDataError, match=option):
        EvaluationSettings(**bad)


def test_every_metric_left_out_has_a_reason() -> None:
    lpips_missing = {"lpips_i": "no torchvision", "lpips_d": "no torchvision"}
    one_image = {"dino_i": 0.5, "dino_d": None, "clip_d": None, "pres": 0.2}
    assert undefined_metric_reasons(one_image, lpips_missing) == {"dino_d": "needs 2 or more images per prompt",
                                                                 "clip_d": "needs 2 or more images per prompt"}
    # LPIPS loaded but one image per prompt: LPIPS-D is explained too, PRES absent is named.
    reasons = undefined_metric_reasons({**one_image, "lpips_i": 0.3, "lpips_d": None, "pres": None}, {})
    assert set(reasons) == {"dino_d", "clip_d", "lpips_d", "pres"}
