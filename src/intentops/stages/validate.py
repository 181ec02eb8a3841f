"""Stage `validate`: run the Great Expectations suites on the canonical table and publish Data Docs.

Two suites, versioned in code: `canonical_rows` (one row per utterance) and `class_counts` (one row per
taxonomy label). Checks GX has no single expectation for (conflicting labels, train/test leakage, class
counts) are expressed as derived columns that built-in expectations then constrain, so every check and
its failing rows appear in Data Docs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from intentops.config import check_stage_args, load_params
from intentops.data.readers import match_key
from intentops.data.taxonomy import Taxonomy
from intentops.errors import DataValidationError, cli_entry
from intentops.io import atomic_path, write_json

log = logging.getLogger(__name__)

# Bump when an expectation is added, removed or changed: it is stored in the suite's meta and the result.
SUITE_VERSION = "1.1.0"  # 1.1.0: reviewed feedback rows (origin_split "feedback")
REQUIRED_COLUMNS = ["text", "label", "origin_split", "source_id"]
TEST_SPLITS = {"test", "oos_test"}
# Feedback rows train the model (split puts them in train), so they count towards each class.
TRAIN_SPLITS = {"train", "feedback"}
FEEDBACK_SPLIT = "feedback"


def derive_row_checks(table: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the row suite constrains.

    - text_key: normalised, case-folded text;
    - labels_for_text_in_split: distinct labels the same text_key has within its split (conflict if > 1);
    - labels_for_text_overall: the same across all splits (cross-split conflicts, a warning);
    - leaks_into_test: the exact text occurs in a test split and in a non-test split;
    - feedback_repeat: a feedback row whose text_key an earlier feedback row already has (the export
      writes each reviewed item once, so a repeat means the file was edited or concatenated by hand).
    """
    df = table.copy()
    df["text"] = df["text"].astype("string")
    df["text_key"] = df["text"].fillna("").map(match_key)
    df["labels_for_text_in_split"] = df.groupby(["origin_split", "text_key"])["label"].transform("nunique")
    df["labels_for_text_overall"] = df.groupby("text_key")["label"].transform("nunique")
    is_test = df["origin_split"].isin(TEST_SPLITS)
    test_texts, other_texts = set(df.loc[is_test, "text"].dropna()), set(df.loc[~is_test, "text"].dropna())
    df["leaks_into_test"] = df["text"].isin(test_texts & other_texts)
    is_feedback = df["origin_split"] == FEEDBACK_SPLIT
    df["feedback_repeat"] = is_feedback & df[is_feedback].duplicated("text_key").reindex(
        df.index, fill_value=False
    )
    return df


def class_counts(table: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per taxonomy label: its number of training rows and its ratio to the smallest class."""
    counts = table[table["origin_split"].isin(TRAIN_SPLITS)]["label"].value_counts()
    frame = pd.DataFrame({"label": labels})
    frame["n_train"] = frame["label"].map(counts).fillna(0).astype(int)
    smallest = max(int(frame["n_train"].min()), 1)
    frame["ratio_to_smallest"] = frame["n_train"] / smallest
    return frame


ROW_FIX = "correct or remove the rows listed above in the source data, then rerun `dvc repro`"


def _meta(fix: str, names: str = "rows") -> dict:
    """What an expectation's failure report needs besides GX's result: the fix line and what it names."""
    return {"fix": fix, "names": names}


def _relaxable(setting: str, value, strict: bool) -> str:
    """The fix line of a check a setting relaxes: the setting first, then strict mode if it is on."""
    if strict:
        return f"-S {setting}={value} accepts them; -S validate.strict=false reports them as a warning"
    return f"-S {setting}={value} silences this warning"


# long: one declarative list of expectations per suite, read top to bottom
def build_suites(labels: list[str], oos_label: str | None, params) -> dict[str, list]:
    """The expectations of each suite, keyed by the name of the frame (and suite) they validate.

    Texts shorter than `text_min_chars` and intents with fewer than `min_examples_per_class` training rows are
    warnings (real traffic has one-character messages; small intents still train) unless `strict`, which
    makes them stops. Each expectation's meta holds the fix its failure report prints, naming the setting that
    relaxes it where one does.
    """
    import great_expectations.expectations as gxe

    allowed = list(labels) + ([oos_label] if oos_label else [])
    strict = bool(getattr(params, "strict", False))
    W, C = "warning", "critical"
    soft = C if strict else W
    rows = [
        gxe.ExpectColumnToExist(
            column=c,
            description=f"required column `{c}` is present",
            meta=_meta("re-run `dvc repro ingest` (the canonical table is written by it)"),
        )
        for c in REQUIRED_COLUMNS
    ]
    rows += [
        gxe.ExpectColumnValuesToNotBeNull(column="text", description="text is non-null", meta=_meta(ROW_FIX)),
        gxe.ExpectColumnValuesToNotMatchRegex(
            column="text",
            regex=r"^\s*$",
            description="text is not blank",
            meta=_meta(
                "fill in or remove the blank rows listed above in the source data (no setting accepts them)"
            ),
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=params.text_min_chars,
            severity=soft,
            description=f"text is at least {params.text_min_chars} characters long"
            + ("" if strict else " (shorter texts are kept)"),
            meta=_meta(_relaxable("validate.text_min_chars", 1, strict)),
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            max_value=params.text_max_chars,
            description=f"text is at most {params.text_max_chars} characters long",
            meta=_meta(
                "raise -S validate.text_max_chars=N (serving.max_text_chars follows it), or shorten the rows "
                "listed above"
            ),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="label", description="label is non-null", meta=_meta(ROW_FIX)
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label",
            value_set=allowed,
            description="labels are within the taxonomy (extended by intents proposed as new:<name> in feedback)",
            meta=_meta(
                "correct the labels listed above, or list them in the taxonomy file (data.taxonomy); "
                "out-of-scope rows take data.oos_label"
            ),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="feedback_repeat",
            value_set=[False],
            description="no duplicate texts in the reviewed feedback (data/feedback/labels.csv)",
            meta=_meta(
                "remove the repeated rows from data/feedback/labels.csv (`intentops label export` writes it)"
            ),
        ),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["origin_split", "text"],
            severity=W,
            description="no exact duplicate texts within a split (after whitespace normalisation); `split` keeps one",
            meta=_meta(ROW_FIX),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="labels_for_text_in_split",
            max_value=1,
            description="no conflicting labels: the same normalised text never has two labels within a split",
            meta=_meta(
                "give each text listed above one label in the source data (no setting accepts conflicts)"
            ),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="leaks_into_test",
            value_set=[False],
            severity=C if params.fail_on_leakage else W,
            description="no train/test leakage (exact text)"
            + ("" if params.fail_on_leakage else "; `split` drops the non-test copies"),
            meta=_meta(
                "-S validate.fail_on_leakage=false lets `split` drop the non-test copies"
                if params.fail_on_leakage
                else "nothing to do unless they are mislabelled: `split` drops the non-test copies"
            ),
        ),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["origin_split", "text_key"],
            severity=W,
            description="no near-duplicates (case/whitespace) within a split; `split` keeps the first",
            meta=_meta(ROW_FIX),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="labels_for_text_overall",
            max_value=1,
            severity=W,
            description="no conflicting labels across splits; `split` keeps only the test copy",
            meta=_meta(ROW_FIX),
        ),
    ]
    minimum = params.min_examples_per_class
    add = "add training examples of the intents listed above"
    classes = [
        gxe.ExpectColumnValuesToBeBetween(
            column="n_train",
            min_value=1,
            severity=soft,
            description="each intent of the taxonomy has training examples"
            + ("" if strict else " (one without is never predicted; its test rows count as errors)"),
            meta=_meta(
                f"{add}, or drop them from the taxonomy file"
                + ("; -S validate.strict=false reports them as a warning" if strict else ""),
                names="classes",
            ),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_train",
            min_value=minimum,
            severity=soft,
            description=f"each intent has at least {minimum} training examples"
            + ("" if strict else " (smaller intents train, and stay out of val: see `split`)"),
            meta=_meta(
                f"{add}, or {_relaxable('validate.min_examples_per_class', 1, strict)}", names="classes"
            ),
        ),
        gxe.ExpectColumnMaxToBeBetween(
            column="ratio_to_smallest",
            max_value=params.imbalance_ratio_warn,
            severity=W,
            description=f"class-imbalance ratio (largest/smallest class) is reported; warns above {params.imbalance_ratio_warn}",
            meta=_meta(
                "a warning only; -S validate.imbalance_ratio_warn=R raises the bar (small intents are listed "
                "under the training-examples check)",
                names="classes",
            ),
        ),
    ]
    return {"canonical_rows": rows, "class_counts": classes}


def run_validation(frames: dict[str, pd.DataFrame], suites: dict, docs_dir: Path) -> dict:
    """Validate each frame with its suite through a GX Checkpoint; build Data Docs into `docs_dir`.

    Returns:
        a summary: {"success", "critical_failures", "warnings", "results": [...], "docs": index path}
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(
        globally=False
    )  # one bar per metric batch is noise in `dvc repro`
    ctx.add_data_docs_site(
        site_name="intentops",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = ctx.data_sources.add_pandas("intentops")
    results = []
    for name, frame in frames.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, meta={"version": SUITE_VERSION}))
        for expectation in suites[name]:
            suite.add_expectation(expectation)
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}_vd", data=batch, suite=suite)
        )
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[vd],
                actions=[UpdateDataDocsAction(name="docs", site_names=["intentops"])],
                result_format=_result_format(frame),
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for vr in run.run_results.values():
            for r in vr.results:
                results.append(_summarise(name, r))
    critical = [r for r in results if not r["success"] and r["severity"] == "critical"]
    warnings = [r for r in results if not r["success"] and r["severity"] != "critical"]
    return {
        "success": not critical,
        "suite_version": SUITE_VERSION,
        "expectations": len(results),
        "critical_failures": critical,
        "warnings": warnings,
        "results": results,
        "docs": str(docs_dir / "index.html"),
    }


# Failing rows are named by their source line (file:line), failing classes by their label: never by the position
# in an internal table.
INDEX_COLUMNS = ("source_id", "label")
MAX_EXAMPLES = {"rows": 5, "classes": 200}


def _result_format(frame: pd.DataFrame) -> dict:
    index = next((c for c in INDEX_COLUMNS if c in frame.columns), None)
    return {"result_format": "COMPLETE", **({"unexpected_index_column_names": [index]} if index else {})}


def _summarise(suite: str, r) -> dict:
    cfg = r.expectation_config
    res = r.result or {}
    meta = dict(cfg.meta or {})
    kwargs = {k: v for k, v in cfg.kwargs.items() if k in ("column", "column_list")}
    examples = res.get("unexpected_index_list") or res.get("partial_unexpected_list") or []
    return {
        "suite": suite,
        "expectation": cfg.type,
        "description": cfg.description,
        **kwargs,
        "severity": str(getattr(cfg, "severity", "critical") or "critical").split(".")[-1].lower(),
        "success": bool(r.success),
        "unexpected_count": res.get("unexpected_count"),
        "observed_value": res.get("observed_value"),
        "names": meta.get("names", "rows"),
        "fix": meta.get("fix"),
        "examples": [_plain(x) for x in examples[: MAX_EXAMPLES[meta.get("names", "rows")]]],
    }


def _plain(x):
    return (
        {k: _plain(v) for k, v in x.items()}
        if isinstance(x, dict)
        else (x if isinstance(x, (str, int, float, bool, type(None))) else str(x))
    )


def describe(result: dict, table: pd.DataFrame, counts: pd.DataFrame | None = None) -> list[str]:
    """Lines naming what one failed expectation found: its rows (source line, text, label) or its classes with
    their training-row counts, then the fix (the setting that relaxes it, where one does)."""
    target = result.get("column") or result.get("column_list") or ""
    n = result["unexpected_count"] or 0
    unit = "intent(s)" if result["names"] == "classes" else "row(s)"
    found = [] if result["unexpected_count"] is None else [f"{n} unexpected {unit}"]
    if result.get("observed_value") is not None:
        found.append(f"observed {result['observed_value']}")
    lines = [f"  - {result['description']} [{result['expectation']} on {target}]: {', '.join(found)}"]
    if result["names"] == "classes":
        lines += _class_lines(result["examples"], counts)
    else:
        lines += _row_lines(result["examples"], table)
        if n > len(result["examples"]):
            lines.append(f"      ... and {n - len(result['examples'])} more (Data Docs list them all)")
    if result.get("fix"):
        lines.append(f"    fix: {result['fix']}")
    return lines


def _class_lines(examples: list, counts: pd.DataFrame | None) -> list[str]:
    n_train = {} if counts is None else dict(zip(counts["label"], counts["n_train"], strict=True))
    named = [ex["label"] for ex in examples if isinstance(ex, dict) and "label" in ex]
    if not named:
        return [f"      {ex!r}" for ex in examples]
    return ["      " + ", ".join(f"{label!r}: {n_train.get(label, '?')} training row(s)" for label in named)]


def _row_lines(examples: list, table: pd.DataFrame) -> list[str]:
    by_id = table.set_index("source_id") if "source_id" in table.columns else None
    lines = []
    for ex in examples:
        sid = ex.get("source_id") if isinstance(ex, dict) else None
        if sid is not None and by_id is not None and sid in by_id.index:
            row = by_id.loc[sid]
            row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
            lines.append(f"      {sid}: text={str(row['text'])[:80]!r} label={row['label']!r}")
        else:
            lines.append(f"      {ex!r}")
    return lines


def failure_message(summary: dict, table: pd.DataFrame, counts: pd.DataFrame | None = None) -> str:
    """A readable summary of the critical failures: expectation, counts, the rows or classes, and each fix."""
    lines = [f"{len(summary['critical_failures'])} critical data expectation(s) failed:"]
    for f in summary["critical_failures"]:
        lines += describe(f, table, counts)
    return "\n".join(lines)


def failure_fix(summary: dict) -> str:
    """The error's fix line: each failed check's own fix, once, in order."""
    fixes = list(dict.fromkeys(f["fix"] for f in summary["critical_failures"] if f.get("fix")))
    return " | ".join(fixes) or ROW_FIX


@cli_entry
def main() -> None:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    cfg = load_params()
    paths = cfg.paths
    table = pd.read_parquet(paths.canonical)
    taxonomy = Taxonomy.read(paths.taxonomy)
    labels = list(taxonomy.labels)
    frames = {"canonical_rows": derive_row_checks(table), "class_counts": class_counts(table, labels)}
    suites = build_suites(labels, taxonomy.oos_label, cfg.validate)
    failed_dir = Path(paths.validation_dir).with_name(Path(paths.validation_dir).name + "-failed")
    with atomic_path(paths.validation_docs) as docs:
        docs.mkdir(parents=True)
        summary = run_validation(frames, suites, docs)
        summary["class_imbalance_ratio"] = float(frames["class_counts"]["ratio_to_smallest"].max())
        summary["rows"] = len(table)
        summary["docs"] = str(Path(paths.validation_docs) / "index.html")
        if not summary["success"]:
            # Keep the last good verdict and reports in place; publish this run's evidence next to them.
            shutil.rmtree(failed_dir, ignore_errors=True)
            shutil.copytree(docs, failed_dir / "data_docs")
            write_json(failed_dir / "result.json", summary)
            raise DataValidationError(
                failure_message(summary, table, frames["class_counts"]),
                where=f"{paths.canonical} (Data Docs: {failed_dir}/data_docs/index.html)",
                fix=failure_fix(summary),
            )
    # The verdict (the stage's only DVC output, and split's dependency) holds what the data is, never when it was
    # checked; the Data Docs next to it carry GX's run times, so they are a report, not an output.
    write_json(paths.validation_result, summary)
    shutil.rmtree(failed_dir, ignore_errors=True)
    for w in summary["warnings"]:
        log.warning("data warning:\n%s", "\n".join(describe(w, table, frames["class_counts"])))
    log.info(
        "validation passed: %d expectations, %d warning(s); class-imbalance ratio %.2f; Data Docs at %s",
        summary["expectations"],
        len(summary["warnings"]),
        summary["class_imbalance_ratio"],
        summary["docs"],
    )


if __name__ == "__main__":
    check_stage_args("validate", __doc__)  # --help, or exit 2 on any argument
    main()
