"""CLIP's real tokenizer, converted offline from open_clip_torch's vocabulary file, against an independent
implementation (tests/clip_bpe_reference.py) that reads that file itself."""

from __future__ import annotations

import gzip
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from clip_bpe_reference import ReferenceClipTokenizer
from transformers import CLIPTokenizer

from pdm_lightning import clip_vocab
from pdm_lightning.clip_vocab import (
    SOURCE_ENV,
    VOCAB_SIZE,
    WHEEL_MEMBER,
    ClipVocabularyError,
    read_vocabulary,
    tokenizer_dir,
    vocabulary_gz,
)
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.evaluation.prompts import bundled_dreambench
from pdm_lightning.training.datamodule import DreamBoothDataModule

LONG_PROMPT = (
    "a highly detailed photograph of sks dog sitting on a red velvet armchair in a sunlit victorian library, "
    "surrounded by towering oak bookshelves, brass reading lamps, scattered manuscripts and a sleeping cat, "
    "soft golden hour light through stained glass windows, volumetric dust, shallow depth of field, 85mm lens, "
    "kodak portra 400 film grain, award winning composition, trending on artstation, ultra sharp focus"
)
PROMPTS = [
    # identifiers alone and in the usual frame
    "sks", "xjy", "ohwx", "zwx", "bnha", "a photo of sks dog", "a photo of xjy backpack", "ohwx man, portrait",
    # case, whitespace, contractions
    "A Photo Of SKS Dog", "  a\tphoto \n of   sks\r\n dog  ", "it's the dog's toy; we're sure they'll've gone, I'm off, he'd",
    # punctuation and digits
    "hello, world!!! (sks) -- dog... ?!", "\"quoted\" 'single' [brackets] {braces} <angles> #hashtag @user",
    "3 dogs, 12345 cats, 3.14159, 1st 2nd 3rd, 2024-01-01 12:30, 50% off, $9.99",
    "a_b-c/d\\e|f~g`h^i", "!!!???...,,,",
    # unicode: accents (composed and decomposed), other scripts, emoji, symbols
    "café naïve résumé Ångström Straße", "cafe\u0301 nai\u0308ve", "東京の犬 の写真", "фото собаки", "صورة كلب",
    "🐶🐕 dog 🎉✨ ❤️", "a photo of sks 🐶", "ﬁne ligature — em dash … ellipsis", "\u00a0non\u00a0breaking\u200bzero width",
    # repeated symbols (BPE merging overlapping pairs)
    "aaaaaaaaa", "lololololol", "zzzzzzz", "hahahahaha",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def reference(clip_vocabulary_gz: Path) -> ReferenceClipTokenizer:
    return ReferenceClipTokenizer(clip_vocabulary_gz)


def dreambench_prompts() -> list[str]:
    bench = bundled_dreambench()
    templates = sorted(set(bench.object_prompts) | set(bench.live_prompts))
    return [template.format("sks", noun) for template in templates for noun in sorted(set(bench.classes.values()))]


def test_converted_vocabulary_is_clips(clip_tokenizer: CLIPTokenizer, reference: ReferenceClipTokenizer) -> None:
    assert len(clip_tokenizer) == VOCAB_SIZE == 49408
    assert clip_tokenizer.get_vocab() == reference.ids  # every token at CLIP's id
    assert clip_tokenizer.model_max_length == 77
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_known_ids(clip_tokenizer: CLIPTokenizer, reference: ReferenceClipTokenizer) -> None:
    # The ids every Stable Diffusion 1.x/2.x run sees for DreamBooth's default prompt.
    expected = [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert clip_tokenizer("a photo of sks dog").input_ids == expected
    assert reference.encode("a photo of sks dog") == expected


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_prompt_ids_match_the_reference(clip_tokenizer: CLIPTokenizer, reference: ReferenceClipTokenizer, prompt: str) -> None:
    ours = clip_tokenizer(prompt, truncation=True, max_length=77).input_ids
    assert ours == reference.encode(prompt), (clip_tokenizer.convert_ids_to_tokens(ours), reference.tokens(prompt))
    with warnings.catch_warnings():  # transformers warns about sequences over 77
        warnings.simplefilter("ignore")
        assert clip_tokenizer(prompt, verbose=False).input_ids == reference.encode(prompt, max_length=None)


def test_dreambench_prompts_match_the_reference(clip_tokenizer: CLIPTokenizer, reference: ReferenceClipTokenizer) -> None:
    prompts = dreambench_prompts()
    assert len(prompts) > 500
    ours = clip_tokenizer(prompts, truncation=True, max_length=77).input_ids
    assert [ids for ids in ours] == [reference.encode(p) for p in prompts]


def test_long_prompt_is_cut_to_77_with_end_token(clip_tokenizer: CLIPTokenizer, reference: ReferenceClipTokenizer) -> None:
    full = reference.encode(LONG_PROMPT, max_length=None)
    assert len(full) > 77
    cut = clip_tokenizer(LONG_PROMPT, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(cut) == 77 and cut[-1] == 49407 and cut[:-1] == full[:76]


def test_padding_tokens_of_sd1_and_sd2(clip_tokenizer: CLIPTokenizer) -> None:
    sd1 = clip_tokenizer("sks dog", padding="max_length", max_length=77).input_ids
    assert sd1[:4] == [49406, 48136, 1929, 49407] and set(sd1[4:]) == {49407}
    sd2 = clip_vocab.load_clip_tokenizer(pad_token="!")
    padded = sd2("sks dog", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 48136, 1929, 49407] and set(padded[4:]) == {0}  # "!" is id 0
    assert sd2("!").input_ids == [49406, 0, 49407]


def test_long_prompt_warning_on_the_real_vocabulary(instance_dir: Path, clip_tokenizer_model_dir: Path) -> None:
    """The data module's 77-token warning counts CLIP's real tokens."""

    def setup(prompt: str) -> None:
        DreamBoothDataModule(str(instance_dir), prompt, ModelSource(str(clip_tokenizer_model_dir)), resolution=64).setup("fit")

    with pytest.warns(UserWarning, match=r"has 8\d tokens; the text encoder reads only the first 77"):
        setup(LONG_PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup("a photo of sks dog " + "very " * 70)  # 2 + 5 + 70 = 77 tokens: fits exactly
    with pytest.warns(UserWarning, match="has 78 tokens"):
        setup("a photo of sks dog " + "very " * 71)


# --- obtaining the file ---------------------------------------------------------------------------------


def test_cached_tokenizer_folder_has_both_file_sets(clip_tokenizer: CLIPTokenizer) -> None:
    folder = tokenizer_dir()
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "merges.txt").read_text().count("\n") == 1 + 48894  # header + CLIP's merges


def test_local_sources_wheel_gz_and_text(tmp_path: Path, clip_vocabulary_gz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = clip_vocabulary_gz.read_bytes()
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(WHEEL_MEMBER, data)
    text = tmp_path / "vocab.txt"
    text.write_bytes(gzip.decompress(data))
    for number, source in enumerate((wheel, clip_vocabulary_gz, text)):
        cached = vocabulary_gz(source, tmp_path / f"cache{number}")
        assert gzip.decompress(cached.read_bytes()) == gzip.decompress(data)
    monkeypatch.setenv(SOURCE_ENV, str(wheel))  # the environment variable does the same
    assert vocabulary_gz(cache_dir=tmp_path / "cache-env").is_file()


def test_wrong_and_damaged_files_are_refused(tmp_path: Path, clip_vocabulary_gz: Path) -> None:
    wrong = tmp_path / "other.txt.gz"
    wrong.write_bytes(gzip.compress(b"#version: 0.2\nt h\n"))
    with pytest.raises(ClipVocabularyError, match=rf"not CLIP's BPE vocabulary.*{SOURCE_ENV}"):
        read_vocabulary(wrong)
    empty_wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(empty_wheel, "w") as archive:
        archive.writestr("open_clip/other.txt", "x")
    with pytest.raises(ClipVocabularyError, match="has no open_clip/bpe_simple_vocab_16e6.txt.gz"):
        read_vocabulary(empty_wheel)
    with pytest.raises(ClipVocabularyError, match="does not exist"):
        read_vocabulary(tmp_path / "missing.gz")
    # A damaged cached copy is replaced from the source.
    cache = tmp_path / "cache"
    cached = vocabulary_gz(clip_vocabulary_gz, cache)
    cached.write_bytes(cached.read_bytes()[:1000])
    assert vocabulary_gz(clip_vocabulary_gz, cache).read_bytes() == clip_vocabulary_gz.read_bytes()


def test_no_pypi_and_no_local_copy_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # pip "fails" without touching the network
    with pytest.raises(ClipVocabularyError, match=rf"Could not download open_clip_torch==.*set \${SOURCE_ENV}"):
        vocabulary_gz(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "bpe_simple_vocab_16e6.txt.gz").exists()


def test_command_line_writes_a_tokenizer_folder(tmp_path: Path, clip_vocabulary_gz: Path, capsys: pytest.CaptureFixture) -> None:
    clip_vocab.main([str(tmp_path / "sd2-tokenizer"), "--pad_token", "!"])
    assert f"CLIP tokenizer: {tmp_path / 'sd2-tokenizer'}" in capsys.readouterr().out
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "sd2-tokenizer")
    assert tokenizer.pad_token == "!" and tokenizer.model_max_length == 77
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert (tmp_path / "sd2-tokenizer" / "vocab.json").is_file() and (tmp_path / "sd2-tokenizer" / "merges.txt").is_file()
