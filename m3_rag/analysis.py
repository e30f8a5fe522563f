"""The BM25 leg's analyzer: text -> terms -> term ids, independent of any model's tokenizer.

A dense-only model's WordPiece vocabulary splits scripts it was not trained on into single
letters and ``[UNK]`` (an English vocabulary on Arabic, Chinese, Russian...), and BM25 over
those pieces ranks almost at random. :class:`UnicodeAnalyzer` segments text the way search
engines do, for every script:

1. Unicode NFKC normalisation, then case folding (``str.casefold``: ß -> ss, Σ/ς -> σ);
2. words on Unicode boundaries: runs of letters with their combining marks and digits;
3. scripts written without spaces (Han, Hiragana, Katakana, Hangul, Thai, Lao, Khmer,
   Myanmar) as overlapping character bigrams, a lone character as itself (Lucene's
   ``CJKAnalyzer``/``CJKBigramFilter`` convention);
4. optional stopwords (dropped), then a Snowball stemmer (``PyStemmer``; one language,
   English by default, applied to the words of the other scripts; ``stemmer=None`` for
   none). English stemming measured best across the shipped multilingual set and beir-mini
   msmarco and dbpedia (``benchmarks/bench_analyzer.py``, docs/benchmarks.md); it leaves
   scripts it does not know unchanged.

Terms map to ids by hashing (:func:`term_id`, CRC-32 of the UTF-8 term modulo
``2**31 - 1``): no vocabulary to store or share between writers, the same ids in every
backend. Two different terms share an id with probability about ``n**2 / 2**32`` for ``n``
distinct terms (about 230 pairs among a million terms).
"""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import regex

__all__ = [
    "HASH_SPACE",
    "Analyzer",
    "UnicodeAnalyzer",
    "analyzer_from_config",
    "term_id",
]

HASH_SPACE = 2**31 - 1
"""Term ids are in ``[0, HASH_SPACE)``; ``HASH_SPACE`` itself is never a term id."""

Analyzer = Callable[[str], list[str]]

_NO_SPACE = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
# a run of a no-space script, or a word: letters, combining marks, digits of other scripts
_TOKENS = regex.compile(
    rf"(?V1)(?P<bigram>[{_NO_SPACE}]+)|(?P<word>[[\p{{L}}\p{{M}}\p{{N}}]--[{_NO_SPACE}]]+)"
)


def term_id(term: str) -> int:
    """The id of a term: CRC-32 of its UTF-8 bytes modulo :data:`HASH_SPACE`."""
    return zlib.crc32(term.encode("utf-8")) % HASH_SPACE


class UnicodeAnalyzer:
    """Multilingual BM25 analyzer (see the module docstring).

    Args:
        stemmer: A Snowball language (``"english"``, the default, ``"russian"``,
            ``"arabic"``...) or ``None`` for no stemming.
        stopwords: Terms to drop (compared after normalisation and case folding).

    Example:
        >>> UnicodeAnalyzer(stemmer=None)("BGE-M3 支持多语言 retrieval и Поиск")
        ['bge', 'm3', '支持', '持多', '多语', '语言', 'retrieval', 'и', 'поиск']
    """

    name = "unicode"

    def __init__(
        self, stemmer: str | None = "english", stopwords: Iterable[str] | None = None
    ) -> None:
        if stemmer is not None and not isinstance(stemmer, str):
            raise TypeError(f"stemmer must be a Snowball language name or None, got {stemmer!r}")
        if isinstance(stopwords, str):
            raise TypeError("stopwords must be a collection of words, not one str")
        self.stemmer = stemmer
        self.stopwords = frozenset(_fold(w) for w in stopwords or ())
        self._stem: Callable[[list[str]], list[str]] | None = None
        if stemmer is not None:
            import Stemmer

            try:
                self._stem = Stemmer.Stemmer(stemmer).stemWords
            except KeyError:
                raise ValueError(
                    f"unknown stemmer language {stemmer!r}; one of "
                    f"{', '.join(sorted(Stemmer.algorithms()))}"
                ) from None

    def __call__(self, text: str) -> list[str]:
        """Terms of ``text``, in order (with repeats).

        Raises:
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"the analyzer takes one str, got {type(text).__name__}")
        words: list[str] = []
        out: list[str] = []
        for m in _TOKENS.finditer(_fold(text)):
            run = m.group("bigram")
            if run is None:
                words.append(m.group("word"))
                continue
            self._flush(words, out)
            out.extend([run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)])
        self._flush(words, out)
        if self.stopwords:
            out = [t for t in out if t not in self.stopwords]
        return out

    def _flush(self, words: list[str], out: list[str]) -> None:
        if not words:
            return
        if self.stopwords:
            words[:] = [w for w in words if w not in self.stopwords]
        out.extend(self._stem(words) if self._stem is not None else words)
        words.clear()

    def config(self) -> dict[str, Any]:
        """What :func:`analyzer_from_config` needs to rebuild this analyzer."""
        return {"name": self.name, "stemmer": self.stemmer, "stopwords": sorted(self.stopwords)}

    def __repr__(self) -> str:
        return f"UnicodeAnalyzer(stemmer={self.stemmer!r}, stopwords={len(self.stopwords)})"


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def analyzer_from_config(config: Any) -> UnicodeAnalyzer:
    """Rebuild a saved :class:`UnicodeAnalyzer` from its :meth:`~UnicodeAnalyzer.config`.

    Raises:
        ValueError: not a saved unicode analyzer configuration.
    """
    if (
        not isinstance(config, dict)
        or config.get("name") != "unicode"
        or not isinstance(config.get("stopwords", []), list)
    ):
        raise ValueError(f"not a saved analyzer configuration: {config!r:.200}")
    return UnicodeAnalyzer(config.get("stemmer"), config.get("stopwords") or None)


def term_counts(terms: Sequence[str]) -> dict[int, float]:
    """``{term_id: count}`` of a term list (ids by :func:`term_id`)."""
    out: dict[int, float] = {}
    for t in terms:
        i = term_id(t)
        out[i] = out.get(i, 0.0) + 1.0
    return out
