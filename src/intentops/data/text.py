"""Text features shared by drift monitoring and the evaluation slices: digits and money amounts."""

from __future__ import annotations

import re

DIGIT = re.compile(r"\d")
CURRENCY_SYMBOLS = "£$€¥₹₩₽₺¢"
CURRENCY_WORDS = (
    r"usd|eur|gbp|jpy|chf|cad|aud|nzd|sek|nok|dkk|pln|czk|huf|inr|cny|hkd|sgd|mxn|brl|zar|try|rub"
    r"|dollars?|euros?|pounds?|quid|bucks|yen|francs?|rupees?|pence|cents?"
)
NUMBER = r"\d+(?:[.,]\d+)*"
# An amount is a number with a currency beside it, or a number with two decimals ("20.50"); a currency
# sign without a number ("the £ fee") is not one.
AMOUNT = re.compile(
    rf"[{CURRENCY_SYMBOLS}]\s?{NUMBER}"  # £20, $ 5.50
    rf"|{NUMBER}\s?[{CURRENCY_SYMBOLS}]"  # 20€
    rf"|\b{NUMBER}\s?(?:{CURRENCY_WORDS})\b"  # 100 euros, 20usd, 50 quid
    rf"|\b(?:{CURRENCY_WORDS})\s?{NUMBER}"  # EUR 50
    r"|\b\d+[.,]\d{2}\b",  # 20.50
    re.IGNORECASE,
)


def has_digits(text: str) -> bool:
    """True when the text holds a digit."""
    return DIGIT.search(text) is not None


def has_amount(text: str) -> bool:
    """True when the text holds a money amount (see AMOUNT)."""
    return AMOUNT.search(text) is not None
