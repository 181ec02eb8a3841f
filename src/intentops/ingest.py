"""Stage `ingest`: fetch and verify the configured dataset, normalise it into one canonical table."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from intentops.config import load_params
from intentops.data import CANONICAL_COLUMNS
from intentops.data.readers import read_clinc_json, read_csv_rows, read_taxonomy
from intentops.data.sources import FileSpec, fetch_verified, mirror_from
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, write_json, write_parquet

log = logging.getLogger(__name__)
FORMATS = ("csv", "clinc_json")


def parse_file(content: bytes, where: str, key: str, data: DictConfig) -> pd.DataFrame:
    """Parse one fetched file with the reader its dataset format names."""
    if data.format == "csv":
        return read_csv_rows(content, where, key, data.text_column, data.label_column, data.delimiter)
    if data.format == "clinc_json":
        return read_clinc_json(content, where, data.oos_label or "oos")
    raise UserError(f"unknown data.format '{data.format}'", where="conf/data", fix=f"use one of {FORMATS}")


def run_ingest(parts: list[pd.DataFrame], taxonomy: list[str] | None, oos_label: str | None) -> tuple[pd.DataFrame, dict]:
    """Concatenate parsed files into the canonical table and settle the taxonomy.

    Returns:
        (canonical table, taxonomy record {"labels", "oos_label", "source"})
    """
    table = pd.concat(parts, ignore_index=True)[CANONICAL_COLUMNS]
    if taxonomy is None:
        labels = sorted(set(table["label"]) - {oos_label, ""})
        record = {"labels": labels, "oos_label": oos_label, "source": "derived from the data"}
    else:
        record = {"labels": list(taxonomy), "oos_label": oos_label, "source": "taxonomy file"}
    return table, record


def fetch_dataset(data: DictConfig, ingest: DictConfig, raw_dir: Path) -> tuple[list[pd.DataFrame], list[str] | None, list[dict]]:
    """Fetch, verify and parse every configured file; keep a verified copy of each under `raw_dir`."""
    mirror = mirror_from(data.get("mirror"))
    files = data.files or {}
    specs = [FileSpec.from_config(k, v) for k, v in files.items() if v is not None]
    if not specs:
        raise UserError("no data files configured", where=f"conf/data/{data.name}.yaml: files", fix="add at least a train file")
    parts, manifest = [], []
    for spec in specs:
        content, digest, location = fetch_verified(spec, data.name, mirror, ingest.timeout_s, ingest.retries)
        (raw_dir / Path(location).name).write_bytes(content)
        parts.append(parse_file(content, location, spec.key, data))
        manifest.append({"key": spec.key, "location": location, "sha256": digest, "rows": len(parts[-1])})
    taxonomy = None
    if data.get("taxonomy"):
        spec = FileSpec.from_config("taxonomy", data.taxonomy)
        content, digest, location = fetch_verified(spec, data.name, mirror, ingest.timeout_s, ingest.retries)
        (raw_dir / Path(location).name).write_bytes(content)
        taxonomy = read_taxonomy(content, location)
        manifest.append({"key": "taxonomy", "location": location, "sha256": digest, "rows": len(taxonomy)})
    return parts, taxonomy, manifest


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    with atomic_path(paths.raw_dir) as raw_tmp:
        raw_tmp.mkdir(parents=True)
        parts, taxonomy, manifest = fetch_dataset(cfg.data, cfg.ingest, raw_tmp)
        table, tax = run_ingest(parts, taxonomy, cfg.data.oos_label)
        write_json(raw_tmp / "manifest.json", {"dataset": cfg.data.name, "files": manifest})
        # Write the derived outputs before the raw folder is swapped in, so a failure replaces nothing.
        write_parquet(paths.canonical, table)
        write_json(paths.taxonomy, tax)
    counts = table.groupby("origin_split").size().to_dict()
    log.info("ingested %d rows from %s: %s; %d labels (%s)", len(table), cfg.data.name, counts, len(tax["labels"]), tax["source"])


if __name__ == "__main__":
    main()
