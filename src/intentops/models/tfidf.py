"""TF-IDF word + character n-gram features, shared by the `baseline` stage and the `minilm_head` model."""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion


def make_tfidf(
    word_ngram: tuple[int, int] = (1, 2),
    char_ngram: tuple[int, int] = (2, 5),
    min_df: int = 1,
    sublinear_tf: bool = True,
    max_features: int | None = None,
) -> FeatureUnion:
    """An unfitted union of word and char_wb TF-IDF vectorisers (lower-cased, sublinear tf).

    `char_wb` n-grams make the features robust to small typos and inflections, which word n-grams miss.
    """
    common = dict(
        lowercase=True, sublinear_tf=sublinear_tf, min_df=min_df, max_features=max_features, dtype=np.float32
    )
    return FeatureUnion(
        [
            (
                "word",
                TfidfVectorizer(
                    analyzer="word", ngram_range=tuple(word_ngram), token_pattern=r"(?u)\b\w+\b", **common
                ),
            ),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngram), **common)),
        ]
    )


def strip_process_state(union) -> None:
    """Drop what a fitted union holds about this process rather than the fit, before it is pickled.

    sklearn caches `id(stop_words)` (a memory address, different in every process) in `_stop_words_id` to skip
    re-checking the stop words, and sets it again on each use; a pickle holding it is new bytes for the same fit,
    so every run of `train` or `export` made a new DVC output. Removing it only costs a re-check on next use.
    """
    for _, vectorizer in getattr(union, "transformer_list", None) or []:
        vars(vectorizer).pop("_stop_words_id", None)
