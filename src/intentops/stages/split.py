"""Stage `split`: keep the official test split, carve a stratified seeded validation split, remove cross-split repeats."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from intentops.config import check_stage_args, load_params
from intentops.data.readers import FEEDBACK_SPLIT, match_key
from intentops.data.splits import SPLITS
from intentops.errors import UserError, cli_entry
from intentops.io import read_json, write_json, write_parquet

log = logging.getLogger(__name__)

# Origin splits as published, mapped to the split they feed; oos_train is optional (see split.oos_as_class).
# Reviewed feedback joins train only: it is never carved into val or test, so test stays the official split.
ORIGIN_TO_SPLIT = {
    "train": "train",
    "val": "val",
    "test": "test",
    "oos_val": "val",
    "oos_test": "test",
    FEEDBACK_SPLIT: "train",
}


def stratified_holdout(df: pd.DataFrame, fraction: float, seed: int, min_rows: int = 2) -> pd.Series:
    """A boolean mask choosing about `fraction` of each label's rows, at least one and never all of them.

    A label with fewer than `min_rows` rows (and at least 2) gives none: its rows all stay where they are.
    """
    rng = np.random.default_rng(seed)
    mask = pd.Series(False, index=df.index)
    for _, idx in sorted(df.groupby("label").groups.items()):
        idx = np.array(sorted(idx))
        k = int(round(len(idx) * fraction))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= max(2, min_rows) else 0
        mask.loc[rng.permutation(idx)[:k]] = True
    return mask


def too_small_to_carve(df: pd.DataFrame, min_rows: int) -> dict[str, int]:
    """{label: rows} of the labels `stratified_holdout` leaves whole (fewer than `min_rows`, or 2, rows)."""
    counts = df["label"].value_counts()
    return {str(k): int(v) for k, v in sorted(counts[counts < max(2, min_rows)].items())}


def check_split_params(
    table: pd.DataFrame, val_fraction: float, test_fraction: float, holdout_intents
) -> None:
    """Refuse fractions outside (0, 1) and held-out intents the data does not have."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise UserError(
            f"split fractions must be in (0, 1); got val_fraction={val_fraction}, test_fraction={test_fraction}",
            where="conf/config.yaml: split",
            fix="use e.g. split.val_fraction=0.1",
        )
    unknown = sorted(set(holdout_intents) - set(table["label"]))
    if unknown:
        raise UserError(
            f"split.holdout_intents names intents the data does not have: {unknown[:5]}",
            where="conf/config.yaml: split.holdout_intents",
            fix="use labels from data/interim/taxonomy.json, or [] to hold none out",
        )


def drop_repeats(df: pd.DataFrame, stats: dict) -> pd.DataFrame:
    """Keep each text (by `match_key`) only in its highest-precedence split, and once within it; count drops."""
    key = df["text"].map(match_key)
    rank = df["split"].map({"train": 0, "val": 1, "test": 2})
    cross = rank < rank.groupby(key).transform("max")
    # The official test split is never thinned, so results stay comparable with published numbers.
    within = (
        ~cross & (df["split"] != "test") & df.assign(_key=key).duplicated(["split", "_key"], keep="first")
    )
    stats["dropped_cross_split_repeats"] = int(cross.sum())
    stats["dropped_within_split_repeats"] = int(within.sum())
    feedback = df["origin_split"] == FEEDBACK_SPLIT
    stats["feedback"] = {
        "rows": int(feedback.sum()),
        "in_train": int((feedback & ~cross & ~within).sum()),
        "dropped_as_repeats": int((feedback & (cross | within)).sum()),
    }
    return df[~cross & ~within]


def run_split(
    table: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    oos_as_class: bool = False,
    holdout_intents: list[str] | tuple[str, ...] = (),
    min_rows_to_carve: int = 2,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Assign every canonical row to train, val or test.

    Rows whose normalised text (case-folded) also occurs in a later split are dropped from the earlier one,
    with test > val > train as the order of precedence, so no text appears in more than one split;
    repeats within train or val keep their first copy. Test rows are never dropped. Feedback rows go to
    train only and are left out of every carve, so the dataset's own train/val/test assignment does not
    move when feedback arrives.

    Args:
        holdout_intents: intents whose dataset rows are dropped from train and val (test keeps them); a
            simulation of intents the model has never seen. Reviewed feedback rows of these intents stay.
        min_rows_to_carve: a label with fewer dataset rows keeps them all in train when val (or test) is
            carved; stats["kept_whole_in_train"] names them.

    Returns:
        ({split: frame}, stats for reports)
    """
    check_split_params(table, val_fraction, test_fraction, holdout_intents)
    df = table.copy()
    mapping = dict(ORIGIN_TO_SPLIT, oos_train="train" if oos_as_class else None)
    df["split"] = df["origin_split"].map(lambda s: mapping.get(s, "train"))
    dropped_oos_train = int(df["split"].isna().sum())
    df = df[df["split"].notna()].copy()
    stats: dict = {"seed": seed, "dropped_oos_train": dropped_oos_train}
    carvable = (df["split"] == "train") & (df["origin_split"] != FEEDBACK_SPLIT)
    if not (df["split"] == "test").any() or not (df["split"] == "val").any():
        stats["kept_whole_in_train"] = too_small_to_carve(df[carvable], min_rows_to_carve)
    if not (df["split"] == "test").any():
        carve = stratified_holdout(df[carvable], test_fraction, seed, min_rows_to_carve)
        df.loc[carve[carve].index, "split"] = "test"
        stats["test_carved_fraction"] = test_fraction
        carvable &= df["split"] == "train"
    if not (df["split"] == "val").any():
        carve = stratified_holdout(df[carvable], val_fraction, seed + 1, min_rows_to_carve)
        df.loc[carve[carve].index, "split"] = "val"
        stats["val_carved_fraction"] = val_fraction
    if holdout_intents:
        held = (
            df["label"].isin(list(holdout_intents))
            & (df["split"] != "test")
            & (df["origin_split"] != FEEDBACK_SPLIT)
        )
        df = df[~held].copy()
        stats["holdout"] = {"intents": sorted(holdout_intents), "dropped_rows": int(held.sum())}

    df = drop_repeats(df, stats)
    frames = {s: df[df["split"] == s].drop(columns=["split"]).reset_index(drop=True) for s in SPLITS}
    stats["rows"] = {s: len(f) for s, f in frames.items()}
    stats["labels"] = {s: int(f["label"].nunique()) for s, f in frames.items()}
    return frames, stats


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    table = pd.read_parquet(paths.canonical)
    read_json(paths.validation_result)  # the gate: split runs only on data that passed validation
    frames, stats = run_split(
        table,
        cfg.split.val_fraction,
        cfg.split.test_fraction,
        cfg.split.seed,
        cfg.split.get("oos_as_class", False),
        list(cfg.split.get("holdout_intents") or []),
        int(cfg.split.get("min_rows_to_carve", 2)),
    )
    for name, frame in frames.items():
        write_parquet(paths[name], frame)
    write_json(paths.split_stats, stats)
    if stats.get("kept_whole_in_train"):
        small = stats["kept_whole_in_train"]
        log.warning(
            "split: %d intent(s) have fewer than split.min_rows_to_carve=%s rows and stay whole in train (not in "
            "val%s): %s",
            len(small),
            cfg.split.get("min_rows_to_carve", 2),
            "" if "test_carved_fraction" not in stats else " or the carved test",
            ", ".join(f"{k!r}: {v}" for k, v in small.items()),
        )
    log.info(
        "split: %s; dropped %d cross-split and %d within-split repeats",
        stats["rows"],
        stats["dropped_cross_split_repeats"],
        stats["dropped_within_split_repeats"],
    )


if __name__ == "__main__":
    check_stage_args("split", __doc__)  # --help, or exit 2 on any argument
    main()
