"""Data sources, readers and the canonical table (mirrors conf/data/)."""

# The canonical table every stage after `ingest` reads: one row per utterance.
CANONICAL_COLUMNS = ["text", "label", "origin_split", "source_id"]
