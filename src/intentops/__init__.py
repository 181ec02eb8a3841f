"""intentops: a customer-support intent classifier through the whole ML lifecycle."""

# Kept equal to pyproject.toml's version (tests/unit/test_readme.py checks): `intentops --version` reads the
# installed metadata, the API's OpenAPI document this constant.
__version__ = "0.2.0"
