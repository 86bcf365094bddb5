"""Vocabulary: SCAN-compatible building, encoding, JSON round trip and one-line load errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scan_deploy.errors import UserError
from scan_deploy.vocab import Vocabulary

CAPTIONS = [
    "A dog runs.",
    "a dog sits",
    "a cat sits",
    "the dog's ball",
]

# Counts: a=3, dog=3, .=1, runs=1, sits=2, cat=1, the=1, 's=1, ball=1.
SPECIAL = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}


def _original_format(words: list[str]) -> dict[str, Any]:
    """A vocab JSON as the original SCAN `serialize_vocab` writes it."""
    return {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }


def _write(tmp_path: Path, payload: Any, name: str = "coco_precomp_vocab.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return path


def test_build_keeps_words_at_threshold_in_first_occurrence_order() -> None:
    vocab = Vocabulary.build(CAPTIONS, threshold=2)
    assert vocab.word2idx == {**SPECIAL, "a": 4, "dog": 5, "sits": 6}
    assert vocab.idx2word == {i: w for w, i in vocab.word2idx.items()}
    assert vocab.idx == len(vocab) == 7


def test_build_excludes_words_below_threshold() -> None:
    vocab = Vocabulary.build(CAPTIONS, threshold=3)
    assert vocab.word2idx == {**SPECIAL, "a": 4, "dog": 5}
    assert "sits" not in vocab


def test_build_default_threshold_is_four() -> None:
    assert Vocabulary.build(CAPTIONS).word2idx == SPECIAL
    assert Vocabulary.build(CAPTIONS * 2).word2idx == {**SPECIAL, "a": 4, "dog": 5, "sits": 6}


def test_unknown_word_maps_to_unk() -> None:
    vocab = Vocabulary.build(CAPTIONS, threshold=2)
    assert vocab("dog") == 5
    assert vocab("zebra") == 3
    assert "zebra" not in vocab


def test_add_word_keeps_existing_id() -> None:
    vocab = Vocabulary()
    vocab.add_word("a")
    vocab.add_word("b")
    vocab.add_word("a")
    assert vocab.word2idx == {"a": 0, "b": 1}
    assert vocab.idx == 2


def test_encode_wraps_token_ids_in_start_and_end() -> None:
    vocab = Vocabulary.build(CAPTIONS, threshold=2)
    assert vocab.encode("A dog sits on a zebra.") == [1, 4, 5, 6, 3, 4, 3, 3, 2]
    assert vocab.decode(vocab.encode("a dog sits")) == ["<start>", "a", "dog", "sits", "<end>"]


def test_decode_rejects_unknown_id() -> None:
    with pytest.raises(ValueError, match="token id 99"):
        Vocabulary.build(CAPTIONS, threshold=2).decode([1, 99])


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.build(CAPTIONS, threshold=1)
    path = tmp_path / "out" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.idx2word == vocab.idx2word
    assert loaded.sha256() == vocab.sha256()
    assert json.loads(path.read_text(encoding="utf-8"))["idx2word"]["4"] == "a"


def test_load_original_format_with_string_keys(tmp_path: Path) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "man", "riding"]
    vocab = Vocabulary.load(_write(tmp_path, _original_format(words)))
    assert vocab.word2idx == {w: i for i, w in enumerate(words)}
    assert vocab.idx2word == dict(enumerate(words))
    assert vocab.idx == 7
    assert vocab.encode("A man riding a horse") == [1, 4, 5, 6, 4, 3, 2]


def test_load_without_idx2word_rebuilds_it(tmp_path: Path) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a"]
    vocab = Vocabulary.load(_write(tmp_path, {"word2idx": _original_format(words)["word2idx"]}))
    assert vocab.idx2word == dict(enumerate(words))
    assert vocab.idx == 5


def test_sha256_ignores_formatting_and_key_order(tmp_path: Path) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "é"]
    payload = _original_format(words)
    compact = Vocabulary.load(_write(tmp_path, payload, "compact.json"))
    shuffled = {"word2idx": dict(reversed(payload["word2idx"].items()))}
    indented = Vocabulary.load(_write(tmp_path, json.dumps(shuffled, indent=4), "indented.json"))
    assert compact.sha256() == indented.sha256()
    assert len(compact.sha256()) == 64
    other = Vocabulary.load(_write(tmp_path, _original_format([*words[:5], "b"]), "other.json"))
    assert other.sha256() != compact.sha256()


def _base() -> dict[str, Any]:
    return _original_format(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])


def _without_unk() -> dict[str, Any]:
    return {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "a": 3}}


def _without_start() -> dict[str, Any]:
    return {"word2idx": {"<pad>": 0, "<end>": 1, "<unk>": 2, "a": 3}}


def _gap_in_ids() -> dict[str, Any]:
    return {"word2idx": {**SPECIAL, "a": 4, "dog": 6}}


def _duplicate_id() -> dict[str, Any]:
    return {"word2idx": {**SPECIAL, "a": 4, "dog": 4}}


def _string_id() -> dict[str, Any]:
    return {"word2idx": {**SPECIAL, "a": "4"}}


def _idx2word_mismatch() -> dict[str, Any]:
    payload = _base()
    payload["idx2word"]["5"] = "cat"
    return payload


def _idx2word_missing_entry() -> dict[str, Any]:
    payload = _base()
    del payload["idx2word"]["5"]
    return payload


def _wrong_idx() -> dict[str, Any]:
    return {**_base(), "idx": 9}


@pytest.mark.parametrize(
    ("payload", "field", "expectation"),
    [
        ("{not json", None, "invalid JSON"),
        ([1, 2], None, "expected a JSON object"),
        ({"idx": 4}, "word2idx", "missing"),
        ({"word2idx": ["<pad>"]}, "word2idx", "expected an object"),
        (_without_unk(), "word2idx", "has no '<unk>' entry, expected the special tokens"),
        (_without_start(), "word2idx", "has no '<start>' entry"),
        (_gap_in_ids(), "word2idx", "id of 'dog' is 6, expected unique integer ids 0..5"),
        (_duplicate_id(), "word2idx", "id 4 is used by both 'a' and 'dog'"),
        (_string_id(), "word2idx", "id of 'a' is '4'"),
        (_idx2word_mismatch(), "idx2word", "entry '5' is 'cat', expected the inverse"),
        (_idx2word_missing_entry(), "idx2word", "has 5 entries, expected one per word"),
        (_wrong_idx(), "idx", "is 9, expected the number of words (6)"),
    ],
)
def test_load_errors_name_file_field_and_expectation(
    tmp_path: Path, payload: Any, field: str | None, expectation: str
) -> None:
    path = _write(tmp_path, payload)
    with pytest.raises(UserError) as info:
        Vocabulary.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    if field is not None:
        assert f": {field}: " in message
    assert expectation in message
    assert "\n" not in message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing_vocab.json"
    with pytest.raises(UserError, match="missing_vocab.json: file not found"):
        Vocabulary.load(path)
