"""The categorical effect size of the drift check: total-variation distance beyond chance (drift.excess_tvd)."""

from __future__ import annotations

import random
from collections import Counter

from intentops.monitor.drift import excess_tvd


def shares(labels: list[str]) -> dict[str, float]:
    return {k: n / len(labels) for k, n in Counter(labels).items()}


def draw(rng: random.Random, weights: dict[str, float], n: int) -> list[str]:
    return rng.choices(list(weights), weights=list(weights.values()), k=n)


def test_two_samples_of_many_intents_are_not_an_effect_but_a_new_mix_is():
    rng = random.Random(0)
    intents = {f"intent_{i}": 1.0 + (i % 5) for i in range(72)}
    ref, same = draw(rng, intents, 937), draw(rng, intents, 2000)
    raw = 0.5 * sum(abs(shares(ref).get(k, 0) - shares(same).get(k, 0)) for k in intents)
    # The raw distance of two samples of one distribution is well above a 0.1 minimum effect; beyond chance it is not.
    assert raw > 0.1
    assert excess_tvd(shares(ref), shares(same), 937, 2000) < 0.05
    # 40 % of the rows moved to 5 intents the reference never predicts: a real effect.
    novel = {f"new_{i}": 1.0 for i in range(5)}
    moved = draw(rng, intents, 1200) + draw(rng, novel, 800)
    assert excess_tvd(shares(ref), shares(moved), 937, 2000) > 0.25


def test_a_tiny_shift_in_a_binary_share_is_no_effect_with_many_rows():
    ref = {"true": 0.98, "false": 0.02}
    cur = {"true": 0.99, "false": 0.01}
    assert excess_tvd(ref, cur, 40_000, 40_000) < 0.011
