"""Is the subject's identifier (e.g. ``sks``) a good one for this tokenizer? And which ones would be?

    python -m pdm_lightning.identifier runs/tiny-sd --check sks xjy -n 10

DreamBooth binds the subject to a rare word: ideally a single token the text encoder has little prior
meaning for. An identifier split into several tokens spreads the subject over pieces that each
already mean something; a common word ("dog", "red") drags its meaning along. CLIP's byte-level BPE
vocabulary lists the single bytes first and then every merge in the order it was learned, most
frequent first: a whole-word token's position among the merges measures how common the word is,
without any word list.
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:  # a CLIP-style byte-level BPE tokenizer
    from transformers import PreTrainedTokenizerBase

END_OF_WORD = "</w>"
# Whole-word tokens in the first quarter of the merges are frequent words in CLIP's training text
# (e.g. "dog", "red"); DreamBooth's "sks" sits in the last few percent.
COMMON_FRACTION = 0.25
# Proposals come from the rarest half of the merges.
RARE_FRACTION = 0.5


@dataclass
class IdentifierReport:
    """How a tokenizer sees an identifier.

    Attributes:
        identifier: the identifier checked.
        pieces: the tokens it splits into (end-of-word markers removed).
        token_ids: their ids.
        single_token: it is one token.
        rank_fraction: for a single token, its merge's position in the vocabulary, 0 (most frequent)
            to 1 (rarest); None for several tokens or a single character.
        common: a single token from the most frequent merges (a common word with a meaning of its
            own), or a single character (the letters and bytes every word falls back to are the
            vocabulary's most frequent symbols: with CLIP's, "a" is the article, "v" a letter).
    """

    identifier: str
    pieces: list[str]
    token_ids: list[int]
    single_token: bool
    rank_fraction: float | None
    common: bool

    def problems(self) -> list[str]:
        found = []
        if not self.single_token:
            found.append(
                f"The identifier {self.identifier!r} is {len(self.pieces)} tokens ({' + '.join(self.pieces)}): the "
                "subject gets spread over pieces that already mean something. Prefer a rare single-token word "
                "(`python -m pdm_lightning.identifier MODEL` proposes some)."
            )
        if self.common:
            why = (f"a common word for this tokenizer (merge rank in the first {self.rank_fraction:.0%} of the vocabulary)"
                   if self.rank_fraction is not None else "a single character, among the tokenizer's most frequent symbols")
            found.append(
                f"The identifier {self.identifier!r} is {why}: its existing meaning competes with the subject. Prefer "
                "a rare single-token word (`python -m pdm_lightning.identifier MODEL` proposes some)."
            )
        return found

    def summary(self) -> str:
        rank = f", rarity {self.rank_fraction:.2f} (0 common, 1 rare)" if self.rank_fraction is not None else ""
        return (f"Identifier {self.identifier!r} -> {len(self.pieces)} token(s) "
                f"{list(zip(self.pieces, self.token_ids))}{rank}")


def _base_vocab_size(vocab: dict[str, int]) -> int:
    """How many ids precede the first merge: single characters, alone or with the end-of-word marker."""
    base = [i for token, i in vocab.items() if len(token.removesuffix(END_OF_WORD)) == 1]
    return max(base) + 1 if base else 0


def _merge_count(vocab: dict[str, int], base: int, special_ids: set[int]) -> int:
    return max(1, sum(1 for i in vocab.values() if i >= base and i not in special_ids))


def rank_fraction(tokenizer: PreTrainedTokenizerBase, token_id: int) -> float | None:
    """Position of ``token_id`` among the vocabulary's merges: 0 (learned first, frequent) to 1 (rarest)."""
    vocab = tokenizer.get_vocab()
    base = _base_vocab_size(vocab)
    if token_id < base or token_id in set(tokenizer.all_special_ids):
        return None
    return (token_id - base) / _merge_count(vocab, base, set(tokenizer.all_special_ids))


def check_identifier(
    tokenizer: PreTrainedTokenizerBase, identifier: str, common_fraction: float = COMMON_FRACTION
) -> IdentifierReport:
    """Splits ``identifier`` with ``tokenizer`` and judges it (several tokens? a common word?)."""
    if not identifier.strip():
        raise ValueError("The identifier is empty.")
    tokens = tokenizer.tokenize(identifier)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    single = len(ids) == 1
    fraction = rank_fraction(tokenizer, ids[0]) if single else None
    pieces = [t.removesuffix(END_OF_WORD) for t in tokens]
    single_character = single and len(pieces[0]) == 1
    return IdentifierReport(
        identifier=identifier,
        pieces=pieces,
        token_ids=list(ids),
        single_token=single,
        rank_fraction=fraction,
        common=single_character or (fraction is not None and fraction < common_fraction),
    )


def warn_about_identifier(tokenizer: PreTrainedTokenizerBase, identifier: str) -> IdentifierReport:
    """Logs how ``identifier`` tokenizes and warns about each problem found (run before training)."""
    report = check_identifier(tokenizer, identifier)
    rank_zero_info(report.summary())
    for problem in report.problems():
        warnings.warn(problem, stacklevel=2)
    return report


def propose_identifiers(
    tokenizer: PreTrainedTokenizerBase,
    n: int = 10,
    min_length: int = 3,
    max_length: int = 5,
    rare_fraction: float = RARE_FRACTION,
) -> list[str]:
    """Up to ``n`` rare single-token identifiers, rarest first.

    Candidates are whole-word tokens of ``min_length``-``max_length`` ASCII letters from the rarest
    part of the merges (rank fraction >= ``rare_fraction``) that tokenize back into themselves.
    """
    vocab = tokenizer.get_vocab()
    base = _base_vocab_size(vocab)
    special = set(tokenizer.all_special_ids)
    merges = _merge_count(vocab, base, special)
    proposals = []
    for token, token_id in sorted(vocab.items(), key=lambda item: -item[1]):
        if len(proposals) == n or token_id < base or (token_id - base) / merges < rare_fraction:
            break
        word = token.removesuffix(END_OF_WORD)
        if (token_id in special or not token.endswith(END_OF_WORD) or not re.fullmatch(r"[a-z]+", word)
                or not min_length <= len(word) <= max_length):
            continue
        if tokenizer.tokenize(word) == [token]:
            proposals.append(word)
    return proposals


def infer_identifier(instance_prompt: str, class_prompt: str | None) -> tuple[str | None, str | None]:
    """(identifier, class noun) read off the two training prompts.

    The words both prompts start and end with are their shared frame; the one instance-prompt word
    left between them is the identifier and the class prompt's shared ending is the class noun:
    "a photo of sks dog" / "a photo of dog" -> (sks, dog); "a photo of sks stuffed animal" /
    "a photo of stuffed animal" -> (sks, stuffed animal). None where the prompts do not say
    (no class prompt, no shared ending, or several candidate words). Words both prompts share after
    the noun stay in it ("sks dog in the snow" / "dog in the snow" -> "dog in the snow"): set the
    class noun explicitly for such prompts.
    """
    if not class_prompt:
        return None, None
    instance, cls = re.findall(r"[\w-]+", instance_prompt.lower()), re.findall(r"[\w-]+", class_prompt.lower())
    prefix = 0
    while prefix < min(len(instance), len(cls)) and instance[prefix] == cls[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(instance), len(cls)) - prefix and instance[-1 - suffix] == cls[-1 - suffix]:
        suffix += 1
    between = instance[prefix : len(instance) - suffix]
    if len(between) != 1:
        return None, None
    return between[0], " ".join(cls[len(cls) - suffix :]) or None


def load_tokenizer(model_or_tokenizer: str) -> PreTrainedTokenizerBase:
    """A diffusers pipeline folder's (or hub id's) tokenizer, or a tokenizer folder itself."""
    from transformers import CLIPTokenizer

    path = Path(model_or_tokenizer)
    if path.is_dir() and not (path / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(path)
    return CLIPTokenizer.from_pretrained(model_or_tokenizer, subfolder="tokenizer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="diffusers pipeline folder or hub id (its tokenizer/), or a tokenizer folder")
    parser.add_argument("--check", nargs="*", default=[], help="identifiers to check")
    parser.add_argument("-n", type=int, default=10, help="how many identifiers to propose")
    parser.add_argument("--min_length", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    for identifier in args.check:
        report = check_identifier(tokenizer, identifier)
        print(report.summary())
        for problem in report.problems():
            print(f"  warning: {problem}")
    proposals = propose_identifiers(tokenizer, args.n, args.min_length, args.max_length)
    print("Rare single-token identifiers:", " ".join(proposals) if proposals else "(none in this vocabulary)")


if __name__ == "__main__":
    main()
