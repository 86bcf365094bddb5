"""Word vocabulary, compatible with the original SCAN `vocab.py` and its `{data_name}_vocab.json`.

The JSON format is `{"word2idx": {word: id}, "idx2word": {"id": word}, "idx": n}`; `idx2word` has
string keys because JSON object keys are strings, and may be left out (it is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scan_deploy.atomic import write_json
from scan_deploy.errors import input_error
from scan_deploy.jsonfile import read_json_object
from scan_deploy.tokenizer import tokenize_caption


class Vocabulary:
    """A word <-> id mapping; unknown words map to the `<unk>` id, as in the original SCAN."""

    PAD = "<pad>"
    START = "<start>"
    END = "<end>"
    UNK = "<unk>"
    SPECIAL_TOKENS = (PAD, START, END, UNK)

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        self.idx = 0

    def add_word(self, word: str) -> None:
        """Give `word` the next free id; a word that is already present keeps its id."""
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word: str) -> int:
        if word not in self.word2idx:
            return self.word2idx[self.UNK]
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self.word2idx, self.idx2word, self.idx) == (
            other.word2idx,
            other.idx2word,
            other.idx,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Build a vocabulary like SCAN's `build_vocab`.

        The special tokens get ids 0..3; then every word seen at least `threshold` times, in order
        of first occurrence, so that the same captions always give the same ids.
        """
        counter: Counter[str] = Counter()
        for caption in captions:
            counter.update(tokenize_caption(caption))
        vocab = cls()
        for word in cls.SPECIAL_TOKENS:
            vocab.add_word(word)
        for word, count in counter.items():
            if count >= threshold:
                vocab.add_word(word)
        return vocab

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary JSON file; every problem is reported as a one-line `UserError`."""
        data = read_json_object(path, "a vocabulary JSON file with a 'word2idx' entry")
        if "word2idx" not in data:
            raise input_error(path, "word2idx", "missing, expected an object mapping words to ids")
        word2idx = _check_word2idx(path, data["word2idx"])
        idx2word = {i: w for w, i in word2idx.items()}
        if "idx2word" in data:
            _check_idx2word(path, data["idx2word"], idx2word)
        if "idx" in data and data["idx"] != len(word2idx):
            raise input_error(
                path, "idx", f"is {data['idx']!r}, expected the number of words ({len(word2idx)})"
            )
        vocab = cls()
        vocab.word2idx = word2idx
        vocab.idx2word = dict(sorted(idx2word.items()))
        vocab.idx = len(word2idx)
        return vocab

    def save(self, path: str | Path) -> None:
        """Write the original SCAN JSON format atomically."""
        payload = {
            "word2idx": self.word2idx,
            "idx2word": {str(i): w for i, w in self.idx2word.items()},
            "idx": self.idx,
        }
        write_json(path, payload)

    def sha256(self) -> str:
        """Hex SHA-256 of `word2idx`, independent of how the file was formatted.

        The hashed bytes are the UTF-8 of `json.dumps` of word2idx with entries sorted by id,
        `separators=(",", ":")` and `ensure_ascii=False`.
        """
        ordered = dict(sorted(self.word2idx.items(), key=lambda item: item[1]))
        canonical = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def encode(self, caption: str) -> list[int]:
        """Token ids of a caption as the SCAN data loader makes them: `<start>` ... `<end>`."""
        tokens = [self(token) for token in tokenize_caption(caption)]
        return [self(self.START), *tokens, self(self.END)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words for token ids (for debugging); an unknown id raises `ValueError`."""
        words = []
        for i in ids:
            if int(i) not in self.idx2word:
                raise ValueError(f"token id {i} is not in the vocabulary (ids 0..{self.idx - 1})")
            words.append(self.idx2word[int(i)])
        return words


def _check_word2idx(path: str | Path, word2idx: Any) -> dict[str, int]:
    """Check the ids are integers 0..n-1, each used once, and the special tokens are present."""
    if not isinstance(word2idx, dict):
        raise input_error(path, "word2idx", "expected an object mapping words to ids")
    for word in Vocabulary.SPECIAL_TOKENS:
        if word not in word2idx:
            raise input_error(
                path,
                "word2idx",
                f"has no {word!r} entry, expected the special tokens <pad>, <start>, <end>, <unk>",
            )
    # n ids, each unique and in 0..n-1, are exactly 0..n-1 without gaps.
    expected = f"expected unique integer ids 0..{len(word2idx) - 1} without gaps"
    owner: dict[int, str] = {}
    for word, i in word2idx.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(word2idx):
            raise input_error(path, "word2idx", f"id of {word!r} is {i!r}, {expected}")
        if i in owner:
            raise input_error(
                path, "word2idx", f"id {i} is used by both {owner[i]!r} and {word!r}, {expected}"
            )
        owner[i] = word
    return dict(word2idx)


def _check_idx2word(path: str | Path, idx2word: Any, expected: dict[int, str]) -> None:
    """Check idx2word (string keys, as JSON stores them) is the inverse of word2idx."""
    if not isinstance(idx2word, dict):
        raise input_error(path, "idx2word", "expected an object mapping ids to words")
    by_key = {str(i): word for i, word in expected.items()}
    for key, word in idx2word.items():
        if by_key.get(key) != word:
            raise input_error(
                path,
                "idx2word",
                f"entry {key!r} is {word!r}, expected the inverse of word2idx",
            )
    if len(idx2word) != len(expected):
        raise input_error(
            path,
            "idx2word",
            f"has {len(idx2word)} entries, expected one per word in word2idx ({len(expected)})",
        )
