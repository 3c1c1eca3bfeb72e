"""The identifier check: how the tokenizer splits it, whether it is a common word, rare alternatives."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.identifier import (
    check_identifier,
    infer_identifier,
    main,
    propose_identifiers,
    warn_about_identifier,
)
from pdm_lightning.tiny import build_bpe_files, build_tokenizer
from pdm_lightning.core.loading import ModelSource

# Merges are learned most frequent first: "dog" and "the" are common here, "vyk" the rarest word.
WORDS_BY_FREQUENCY = ("dog", "the", "red", "cat", "sun", "box", "car", "hat", "sks", "zwx", "qlo", "vyk", "ox")


def frequency_ordered_tokenizer(folder: Path) -> CLIPTokenizer:
    # build_bpe_files orders words by length only (stably), so equal-length words keep this order.
    vocab, merges = build_bpe_files(WORDS_BY_FREQUENCY)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder)


def test_split_and_common_identifiers_are_reported(tmp_path: Path) -> None:
    tokenizer = frequency_ordered_tokenizer(tmp_path / "tok")
    rare = check_identifier(tokenizer, "sks")
    assert rare.pieces == ["sks"] and rare.single_token and not rare.common and rare.problems() == []
    assert 0.6 < rare.rank_fraction < 0.75  # the 9th of 13 words learned

    common = check_identifier(tokenizer, "dog")
    assert common.single_token and common.common and common.rank_fraction < 0.1
    assert "common word" in common.problems()[0]

    split = check_identifier(tokenizer, "sksdog")
    assert split.pieces == ["sk", "s", "dog"] and not split.single_token and not split.common
    assert split.token_ids == tokenizer.convert_tokens_to_ids(["sk", "s", "dog</w>"])
    assert "is 3 tokens (sk + s + dog)" in split.problems()[0]
    letter = check_identifier(tokenizer, "q")
    assert letter.rank_fraction is None and letter.common  # a single character: no merge rank, but no rare word
    assert "a single character" in letter.problems()[0]


def test_proposals_are_rare_single_tokens(tmp_path: Path) -> None:
    tokenizer = frequency_ordered_tokenizer(tmp_path / "tok")
    # Rarest first; "ox" is too short; the common words never qualify.
    assert propose_identifiers(tokenizer, n=3) == ["vyk", "qlo", "zwx"]
    assert propose_identifiers(tokenizer, n=20) == ["vyk", "qlo", "zwx", "sks", "hat", "car"]
    assert propose_identifiers(tokenizer, n=20, min_length=2, max_length=2) == ["ox"]
    for word in propose_identifiers(tokenizer, n=20):
        report = check_identifier(tokenizer, word)
        assert report.single_token and not report.common


def test_tiny_tokenizer_and_warnings(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path / "tiny")  # whole-word vocabulary
    assert check_identifier(tokenizer, "sks").pieces == ["sks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_identifier(tokenizer, "sks")
    with pytest.warns(UserWarning, match=r"'zqx' is 3 tokens \(z \+ q \+ x\)"):
        warn_about_identifier(tokenizer, "zqx")
    with pytest.raises(ValueError, match="empty"):
        check_identifier(tokenizer, " ")


def test_identifier_is_read_off_the_prompts() -> None:
    assert infer_identifier("a photo of sks dog", "a photo of dog") == ("sks", "dog")
    assert infer_identifier("A photo of sks plushie.", "a photo of a plushie") == ("sks", "plushie")
    assert infer_identifier("sks", "a photo of dog") == ("sks", None)
    assert infer_identifier("a sks red dog", "a dog") == (None, None)  # two candidates: undecided
    assert infer_identifier("a photo of sks dog", None) == (None, None)


def test_datamodule_checks_the_identifier_before_fit(tiny_model_dir: Path, instance_dir: Path) -> None:
    def setup(instance_prompt: str) -> None:
        DreamBoothDataModule(str(instance_dir), instance_prompt, ModelSource(str(tiny_model_dir)), class_prompt="a photo of dog",
                             resolution=64).setup("fit")

    with pytest.warns(UserWarning, match="'zq' is 2 tokens"):
        setup("a photo of zq dog")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup("a photo of sks dog")


def test_command_line_checks_and_proposes(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(tiny_model_dir), "--check", "sks", "zq", "-n", "4"])
    out = capsys.readouterr().out
    assert "Identifier 'sks' -> 1 token(s) [('sks'," in out
    assert "warning: The identifier 'zq' is 2 tokens (z + q)" in out
    proposals = out.split("Rare single-token identifiers:")[1].split()
    assert len(proposals) == 4 and all(3 <= len(p) <= 5 and p.isalpha() for p in proposals)
    frequency_ordered_tokenizer(tmp_path / "tok")
    main([str(tmp_path / "tok"), "-n", "2"])  # a tokenizer folder works too
    assert capsys.readouterr().out.strip().endswith("vyk qlo")


# --- CLIP's real vocabulary (what SD 1.x / 2.x tokenize with) ------------------------------------------


def test_real_vocabulary_judges_the_usual_identifiers(clip_tokenizer: CLIPTokenizer) -> None:
    sks = check_identifier(clip_tokenizer, "sks")  # DreamBooth's identifier: one rare token
    assert sks.token_ids == [48136] and sks.rank_fraction > 0.95 and not sks.common and sks.problems() == []
    ohwx = check_identifier(clip_tokenizer, "ohwx")  # the community's other favourite: also one rare token
    assert ohwx.single_token and ohwx.rank_fraction > 0.95 and ohwx.problems() == []

    dog = check_identifier(clip_tokenizer, "dog")  # a class noun: among the first 3% of the merges
    assert dog.token_ids == [1929] and dog.rank_fraction < 0.05 and dog.common
    assert "common word" in dog.problems()[0]
    for word in ("the", "red", "photo"):
        assert check_identifier(clip_tokenizer, word).common

    xjy = check_identifier(clip_tokenizer, "xjy")  # a "random" string: three letters, each very common
    assert xjy.pieces == ["x", "j", "y"] and "is 3 tokens (x + j + y)" in xjy.problems()[0]
    assert check_identifier(clip_tokenizer, "sksdog").pieces == ["sk", "s", "dog"]

    article = check_identifier(clip_tokenizer, "a")  # one letter, and the most frequent word
    assert article.single_token and article.common and "a single character" in article.problems()[0]


def test_real_vocabulary_proposals_are_rare_single_tokens(clip_tokenizer: CLIPTokenizer) -> None:
    proposals = propose_identifiers(clip_tokenizer, n=10)
    assert len(proposals) == 10 and len(set(proposals)) == 10
    for word in proposals:
        report = check_identifier(clip_tokenizer, word)
        assert 3 <= len(word) <= 5 and report.single_token and report.rank_fraction > 0.95 and report.problems() == []


def test_datamodule_warns_about_a_split_identifier_on_the_real_vocabulary(
    clip_tokenizer_model_dir: Path, instance_dir: Path
) -> None:
    def setup(instance_prompt: str) -> None:
        DreamBoothDataModule(str(instance_dir), instance_prompt, ModelSource(str(clip_tokenizer_model_dir)),
                             class_prompt="a photo of dog", resolution=64).setup("fit")

    with pytest.warns(UserWarning, match=r"'xjy' is 3 tokens \(x \+ j \+ y\)"):
        setup("a photo of xjy dog")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup("a photo of sks dog")
