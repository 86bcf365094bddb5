"""Caption tokenizer: a standard-library port of NLTK's `word_tokenize` for one sentence.

The original SCAN tokenizes captions with `nltk.tokenize.word_tokenize(caption.lower())`. NLTK is
too heavy for the inference device (and `word_tokenize` needs the downloaded punkt data), so this
module reproduces `NLTKWordTokenizer().tokenize(text)` with the standard `re` module only.

Ported from nltk 3.10.4, `nltk/tokenize/destructive.py` (class `NLTKWordTokenizer`, default
`convert_parentheses=False`): the regexes and their order are copied verbatim, except that the one
possessive quantifier (`*+`, Python 3.11+) is written as the equivalent atomic lookahead
`(?=(...*))\\3` so that the module also runs on Python 3.10.

Known differences from `nltk.word_tokenize`:
- `nltk.word_tokenize` first splits the text into sentences with punkt, so in a caption of several
  sentences the period of each non-final sentence becomes its own token ("bike." here, "bike" "."
  there). A single sentence, the normal caption, tokenizes identically; punkt is not ported
  because it needs NLTK's trained model data.
- NLTK compiles its patterns with the third-party `regex` engine, this port with `re`. The engines
  disagree on what `\\w`, `\\b` and `\\s` mean for some non-ASCII code points: combining marks,
  superscript digits and vulgar fractions, circled letters, ZWJ/ZWNJ, U+001C..U+001F, unassigned
  code points. ASCII and precomposed accented letters (é) tokenize identically.
"""

from __future__ import annotations

import re

_Rule = tuple[re.Pattern[str], str]

_STARTING_QUOTES: list[_Rule] = [
    (re.compile("([«“‘„]|[`]+)", re.U), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", re.U), r"\1 "),
]

_PUNCTUATION: list[_Rule] = [
    # NLTK: r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*+)\s*$" (possessive); group 3 is the same run.
    (re.compile(r'([^\.])(\.)(?=([\]\)}>"\'' "»”’ " r"]*))\3\s*$", re.U), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}", re.U), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]", re.UNICODE), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]", re.U), r" \g<0> "),
]

_PARENS_BRACKETS: _Rule = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")

_DOUBLE_DASHES: _Rule = (re.compile(r"--"), r" -- ")

_ENDING_QUOTES: list[_Rule] = [
    (re.compile("([»”’])", re.U), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]

# MacIntyre contractions (NLTK's CONTRACTIONS4 is unused there too).
_CONTRACTIONS: list[_Rule] = [
    (re.compile(pattern), r" \1 \2 ")
    for pattern in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]


def _apply(rules: list[_Rule], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def word_tokenize(text: str) -> list[str]:
    """Split one sentence into tokens exactly like NLTK's `NLTKWordTokenizer().tokenize(text)`."""
    text = _apply(_STARTING_QUOTES, text)
    text = _apply(_PUNCTUATION, text)
    text = _apply([_PARENS_BRACKETS, _DOUBLE_DASHES], text)
    # NLTK pads with spaces so the ending-quote and contraction rules can anchor on them.
    text = _apply(_ENDING_QUOTES, " " + text + " ")
    return _apply(_CONTRACTIONS, text).split()


def tokenize_caption(caption: str) -> list[str]:
    """Tokenize a caption the way SCAN does: `word_tokenize(caption.lower())`.

    SCAN strips each caption line when it reads the caption files; stripping here too matters
    because leading whitespace changes how a leading quote is read.
    """
    return word_tokenize(caption.strip().lower())
