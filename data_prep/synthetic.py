"""A synthetic English-like corpus for smoke tests and benchmarks where no real corpus is at hand.

Words are random syllable strings drawn with Zipfian frequencies and arranged into sentences
with capitals, punctuation and numbers, so that a tokenizer trained on it has common words,
rare words and digits to deal with, as on real text. Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ea")]


def synthetic_documents(
    n_documents: int, *, seed: int = 0, words_per_document: tuple[int, int] = (50, 400)
) -> list[str]:
    rng = np.random.default_rng(seed)
    lexicon = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(5000)]
    zipf_cdf = np.cumsum(1.0 / np.arange(1, len(lexicon) + 1))
    zipf_cdf /= zipf_cdf[-1]
    documents = []
    for _ in range(n_documents):
        ranks = np.searchsorted(zipf_cdf, rng.random(rng.integers(*words_per_document)))
        words = [lexicon[rank] for rank in ranks]
        for i in rng.choice(len(words), size=len(words) // 40 + 1):
            words[i] = str(rng.integers(0, 100_000))
        sentences, start = [], 0
        while start < len(words):
            end = start + int(rng.integers(5, 25))
            sentence = " ".join(words[start:end])
            sentences.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", "?", "!"]))
            start = end
        documents.append(" ".join(sentences))
    return documents


def write_jsonl(path: str | Path, texts: list[str], text_field: str = "text") -> Path:
    """Write texts as JSONL records `{text_field: text}`, one per line."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({text_field: text}) + "\n")
    return path
