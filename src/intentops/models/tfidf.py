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
