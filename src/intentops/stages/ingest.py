"""Stage `ingest`: fetch and verify the configured dataset, normalise it into one canonical table."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from intentops.config import check_stage_args, load_params
from intentops.data import CANONICAL_COLUMNS
from intentops.data.readers import read_clinc_json, read_csv_rows, read_feedback, read_taxonomy
from intentops.data.sources import FileSpec, fetch_verified, mirror_from
from intentops.data.taxonomy import DEFAULT_OOS_LABEL
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, write_json, write_parquet

log = logging.getLogger(__name__)
FORMATS = ("csv", "clinc_json")


def parse_file(content: bytes, where: str, key: str, data: DictConfig) -> pd.DataFrame:
    """Parse one fetched file with the reader its dataset format names."""
    if data.format == "csv":
        return read_csv_rows(content, where, key, data.text_column, data.label_column, data.delimiter)
    if data.format == "clinc_json":
        return read_clinc_json(content, where, data.oos_label or DEFAULT_OOS_LABEL)
    raise UserError(f"unknown data.format '{data.format}'", where="conf/data", fix=f"use one of {FORMATS}")


def run_ingest(
    parts: list[pd.DataFrame],
    taxonomy: list[str] | None,
    oos_label: str | None,
    feedback: pd.DataFrame | None = None,
    proposed: list[str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Concatenate parsed files (and reviewed feedback) into the canonical table and settle the taxonomy.

    Args:
        feedback: rows from the labelling loop (origin_split "feedback"); `split` puts them in train only.
        proposed: intents labellers proposed; those not already in the taxonomy extend it.

    Returns:
        (canonical table, taxonomy record {"labels", "oos_label", "source", "proposed"})
    """
    frames = [*parts, feedback] if feedback is not None and len(feedback) else parts
    table = pd.concat(frames, ignore_index=True)[CANONICAL_COLUMNS]
    dataset = pd.concat(parts, ignore_index=True)
    if taxonomy is None:
        labels = sorted(set(dataset["label"]) - {oos_label, ""})
        record = {"labels": labels, "oos_label": oos_label, "source": "derived from the data"}
    else:
        record = {"labels": list(taxonomy), "oos_label": oos_label, "source": "taxonomy file"}
    added = [name for name in proposed or [] if name not in record["labels"] and name != oos_label]
    record["labels"] = record["labels"] + added
    record["proposed"] = added
    return table, record


def read_feedback_file(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The reviewed labels (`intentops labels publish`), a dependency of this stage; git keeps their DVC pointer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            "feedback labels file not found",
            where=str(path),
            fix="run `intentops labels restore` (`make run` does): it writes the header-only file when "
            f"{path}.dvc names it, else pulls it from the DVC remote; or export it with `intentops label export`",
        )
    return read_feedback(path.read_bytes(), str(path))


def fetch_dataset(
    data: DictConfig, ingest: DictConfig, raw_dir: Path
) -> tuple[list[pd.DataFrame], list[str] | None, list[dict]]:
    """Fetch, verify and parse every configured file; keep a verified copy of each under `raw_dir`."""
    mirror = mirror_from(data.get("mirror"))
    files = data.files or {}
    specs = [FileSpec.from_config(k, v) for k, v in files.items() if v is not None]
    if not specs:
        raise UserError(
            "no data files configured",
            where=f"conf/data/{data.name}.yaml: files",
            fix="add at least a train file",
        )
    parts, manifest = [], []
    for spec in specs:
        content, digest, location = fetch_verified(spec, data.name, mirror, ingest.timeout_s, ingest.retries)
        (raw_dir / Path(location).name).write_bytes(content)
        parts.append(parse_file(content, location, spec.key, data))
        manifest.append(_entry(spec.key, location, digest, len(parts[-1])))
    taxonomy = None
    if data.get("taxonomy"):
        spec = FileSpec.from_config("taxonomy", data.taxonomy)
        content, digest, location = fetch_verified(spec, data.name, mirror, ingest.timeout_s, ingest.retries)
        (raw_dir / Path(location).name).write_bytes(content)
        taxonomy = read_taxonomy(content, location)
        manifest.append(_entry("taxonomy", location, digest, len(taxonomy)))
    return parts, taxonomy, manifest


def _entry(key: str, location: str, digest: str, rows: int) -> dict:
    """A manifest line: what identifies the file (its name under raw/, sha256), never where this machine read it
    (the mirror's absolute path would make the same data a different output on every machine; fetching logs it)."""
    return {"key": key, "file": Path(location).name, "sha256": digest, "rows": rows}


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    with atomic_path(paths.raw_dir) as raw_tmp:
        raw_tmp.mkdir(parents=True)
        parts, taxonomy, manifest = fetch_dataset(cfg.data, cfg.ingest, raw_tmp)
        feedback, proposed = read_feedback_file(paths.feedback_labels)
        manifest.append(
            {
                "key": "feedback",
                "file": Path(paths.feedback_labels).name,
                "rows": len(feedback),
                "proposed_intents": proposed,
            }
        )
        table, tax = run_ingest(parts, taxonomy, cfg.data.oos_label, feedback, proposed)
        write_json(raw_tmp / "manifest.json", {"dataset": cfg.data.name, "files": manifest})
        # Write the derived outputs before the raw folder is swapped in, so a failure replaces nothing.
        write_parquet(paths.canonical, table)
        write_json(paths.taxonomy, tax)
    counts = table.groupby("origin_split").size().to_dict()
    log.info(
        "ingested %d rows from %s: %s; %d labels (%s; proposed by labellers: %s)",
        len(table),
        cfg.data.name,
        counts,
        len(tax["labels"]),
        tax["source"],
        tax["proposed"] or "none",
    )


if __name__ == "__main__":
    check_stage_args("ingest", __doc__)  # --help, or exit 2 on any argument
    main()
