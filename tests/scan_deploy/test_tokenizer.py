"""The standard-library tokenizer must give NLTK's exact tokens (nltk is a test-only dependency)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scan_deploy.tokenizer import tokenize_caption, word_tokenize

REPO_ROOT = Path(__file__).resolve().parents[2]

CAPTIONS = [
    "a man riding a wave on top of a surfboard.",
    "a man's bike is parked next to a red fire hydrant.",
    "two dogs can't stop playing with a frisbee , in the park",
    "a woman who doesn't want to eat her pizza.",
    "it's a sunny day and kids are flying kites",
    "a black-and-white photo of a 3.5 inch floppy disk.",
    'a sign reading "stop" at an intersection.',
    'a child holding a sign that says "free hugs"',
    "the bus ( number 42 ) drives down the street...",
    "a plate with food (eggs, toast, and bacon).",
    "a hot dog costs $5 at the stand",
    "a cat -- sleeping on a laptop -- next to a mug",
    "people standing around a table; some are eating",
    "a giraffe eating leaves from a tree!",
    "is this a zebra or a horse?",
    "a 'vintage' car parked on the street.",
    "the players' uniforms are blue and white.",
    "a group of people at a 50% off sale.",
    "a man with a sign that reads: we're open",
    "two women they've been shopping, holding bags.",
    "i'm gonna eat this cake, said the boy.",
    "we'll wanna see the game at 3:30 pm.",
    "a sandwich cut in half [with pickles] on a plate.",
    "a bird perched on a branch {near a feeder}.",
    "the train is arriving at platform #9 & 3/4",
    "a person @ the beach with an umbrella",
    "a pizza with lots of cheese * and * pepperoni",
    "cannot see the surfer in the water.",
    "'tis the season: a christmas tree with lights.",
    "a dog that's wearing a hat ...",
    "a 1,000 piece puzzle on a table.",
    "a u.s. flag waving on a pole.",
    "the man said ``hello'' to the crowd.",
    "a kid's toy and the kids' toys.",
    "a man in a t-shirt, jeans, and sneakers.",
    "a woman's purse, a man's wallet and a child's shoe.",
    "he'd like the one that's 2.5 meters tall.",
    "a “quoted” word and a ‘single’ one – with dashes — too.",
    "«bonjour» written on a café wall.",
    "  a caption with surrounding whitespace.  ",
]

_PIECES = [
    "a", "man", "dog", "street", "3.5", "$5", "42", "1,000", "3:30", "t-shirt", "u.s.",
    "'s", "man's", "can't", "cannot", "don't", "it's", "won't", "we're", "they've", "i'll",
    "i'd", "'tis", "gonna", "wanna ", "gimme", "gotta", "lemme", "d'ye", "more'n",
    " ", " ", " ", "  ", ".", ",", "...", "..", "--", "-", ":", ";", "?", "!", "*", "@", "#",
    "&", "%", "(", ")", "[", "]", "{", "}", "<", ">", '"', "''", "``", "'", "`",
    "«", "»", "“", "”", "‘", "’", "„", "–", "—", "\n", "\t", "é", "café",
]  # fmt: skip


def _random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(_PIECES, k=rng.randint(1, 14))) for _ in range(count)]


@pytest.fixture(scope="module")
def nltk_tokenize() -> Callable[[str], list[str]]:
    destructive = pytest.importorskip("nltk.tokenize.destructive")
    return destructive.NLTKWordTokenizer().tokenize


@pytest.mark.parametrize("caption", CAPTIONS)
def test_word_tokenize_matches_nltk_on_captions(
    caption: str, nltk_tokenize: Callable[[str], list[str]]
) -> None:
    assert word_tokenize(caption) == nltk_tokenize(caption)
    assert tokenize_caption(caption) == nltk_tokenize(caption.lower())


def test_word_tokenize_matches_nltk_on_random_strings(
    nltk_tokenize: Callable[[str], list[str]],
) -> None:
    texts = _random_strings(400)
    mismatches = [(t, word_tokenize(t), nltk_tokenize(t)) for t in texts]
    assert [m for m in mismatches if m[1] != m[2]] == []


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        (
            "A Man's dog can't catch the $5 frisbee (3.5 inches).",
            ["a", "man", "'s", "dog", "ca", "n't", "catch", "the", "$", "5", "frisbee",
             "(", "3.5", "inches", ")", "."],
        ),
        (
            'She said "it\'s fine" -- really...',
            ["she", "said", "``", "it", "'s", "fine", "''", "--", "really", "..."],
        ),
        ("  Gonna eat, cannot stop!  ", ["gon", "na", "eat", ",", "can", "not", "stop", "!"]),
        ("", []),
    ],
)  # fmt: skip
def test_tokenize_caption_known_tokens(caption: str, tokens: list[str]) -> None:
    """Pinned outputs, so the tokenizer stays tested where nltk is not installed."""
    assert tokenize_caption(caption) == tokens


def test_import_uses_only_the_standard_library() -> None:
    code = (
        "import sys, scan_deploy.tokenizer; "
        "loaded = {'nltk', 'regex', 'numpy', 'torch'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
