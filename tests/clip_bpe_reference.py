"""A second, independent CLIP tokenizer, written from the description of CLIP's byte-level BPE.

It reads ``bpe_simple_vocab_16e6.txt.gz`` itself (not the converted vocab.json) and shares no code
with pdm_lightning.clip_vocab or transformers, so the tests can hold transformers' CLIPTokenizer on
our converted files to it. What CLIP does to a prompt:

1. clean: Unicode NFC (ftfy's normalization), runs of whitespace to one space, trimmed, lowercase;
2. split into words with CLIP's pattern (the special tokens, English contractions, runs of letters,
   single digits, runs of other non-space characters);
3. write each word's UTF-8 bytes as the printable stand-ins of the byte-level alphabet;
4. BPE: mark the last symbol with ``</w>``, then repeatedly join every occurrence (left to right) of
   the adjacent pair whose merge was learned earliest, until no pair is a merge;
5. look the symbols up in the vocabulary: bytes, bytes + ``</w>``, merges in order, then the two
   special tokens; ``<|startoftext|>`` first, ``<|endoftext|>`` last, at most 77 in all.

(CLIP also unescapes HTML entities with ftfy; transformers does not, and no prompt here has one.)
"""

from __future__ import annotations

import gzip
import itertools
import unicodedata
from pathlib import Path

import regex

WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
START, END = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
CONTEXT_LENGTH = 77
LEARNED_MERGES = 49152 - 256 - 2  # CLIP keeps this many of the file's merges


def byte_stand_ins() -> dict[int, str]:
    """Byte -> one printable character: visible Latin-1 bytes stand for themselves, the other 68
    (controls, space, NBSP, soft hyphen...) take the code points from 256 up, in byte order."""
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    stand_ins, next_free = {}, 256
    for byte in range(256):
        if byte in visible:
            stand_ins[byte] = chr(byte)
        else:
            stand_ins[byte] = chr(next_free)
            next_free += 1
    return stand_ins


class ReferenceClipTokenizer:
    def __init__(self, vocabulary_gz: Path) -> None:
        lines = gzip.decompress(Path(vocabulary_gz).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1 : 1 + LEARNED_MERGES]]
        self.stand_ins = byte_stand_ins()
        # The alphabet is ordered by code point: the visible bytes (< 256) first, then the stand-ins.
        alphabet = sorted(self.stand_ins.values())
        tokens = alphabet + [symbol + WORD_END for symbol in alphabet] + ["".join(pair) for pair in merges] + [START, END]
        self.ids = {token: position for position, token in enumerate(tokens)}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}

    @staticmethod
    def clean(text: str) -> str:
        return " ".join(unicodedata.normalize("NFC", text).split()).lower()

    def words(self, text: str) -> list[str]:
        return WORD_PATTERN.findall(self.clean(text))

    def merge(self, word: str) -> list[str]:
        """The BPE symbols of one word."""
        symbols = [self.stand_ins[byte] for byte in word.encode("utf-8")]
        symbols[-1] += WORD_END
        while len(symbols) > 1:
            ranked = [(self.merge_rank.get(pair, float("inf")), pair) for pair in itertools.pairwise(symbols)]
            rank, (left, right) = min(ranked, key=lambda item: item[0])
            if rank == float("inf"):
                break
            joined, position = [], 0
            while position < len(symbols):
                if position + 1 < len(symbols) and symbols[position] == left and symbols[position + 1] == right:
                    joined.append(left + right)
                    position += 2
                else:
                    joined.append(symbols[position])
                    position += 1
            symbols = joined
        return symbols

    def tokens(self, text: str) -> list[str]:
        out = []
        for word in self.words(text):
            out += [word] if word in (START, END) else self.merge(word)
        return out

    def encode(self, text: str, max_length: int | None = CONTEXT_LENGTH) -> list[int]:
        """Ids with ``<|startoftext|>`` and ``<|endoftext|>``; the words cut to fit ``max_length`` (None: no limit)."""
        body = [self.ids[token] for token in self.tokens(text)]
        if max_length is not None:
            body = body[: max_length - 2]
        return [self.ids[START], *body, self.ids[END]]
