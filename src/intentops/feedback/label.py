"""`intentops label`: label review-queue items, resolve disagreements, measure agreement, export.

Follows docs/labeling-guidelines.md: independent labels, strict majority, adjudication with a
reason for the rest (and for every `unclear` item), Cohen's kappa per annotator pair.

An answer is one line: a taxonomy label, the number of one of the model's suggestions,
`out_of_scope`, `unclear`, `new:<snake_case_name>` (a proposed intent), or empty/`skip`; `quit`
stops. Anything after ` #` is a note (an adjudication requires one: the reason).

Corrections sent through POST /v1/feedback are votes too: a client's latest correction of a queued prediction is
the vote `api:<client>` (load_state), resolved, measured and exported with the CLI's votes; API votes alone
resolve an item under feedback.label.api_votes (resolve; method `api`).

Everything from the store reaches the terminal through `_shown` (intentops.data.text.display_text): a
control character, a bidi override or a lone surrogate in a customer's message is shown as an escape,
never sent raw to the annotator's terminal.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any, TextIO

import pandas as pd

from intentops.data.taxonomy import Taxonomy
from intentops.data.text import display_text, text_problem
from intentops.errors import UserError
from intentops.feedback import store
from intentops.timing import progress

UNCLEAR = "unclear"
OUT_OF_SCOPE = "out_of_scope"
NEW_PREFIX = "new:"
_NEW_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SKIP = {"", "s", "skip"}
_QUIT = {"q", "quit"}

# The columns of labels.csv (`intentops label export`), in order.
EXPORT_COLUMNS = [
    "text",
    "label",
    "prediction_id",
    "method",
    "votes",
    "n_annotators",
    "adjudicator",
    "adjudication_reason",
    "model_version",
    "suggested_intent",
    "guideline_version",
]

PENDING, MAJORITY, ADJUDICATED, NEEDS_ADJUDICATION, API = (
    "pending",
    "majority",
    "adjudicated",
    "needs_adjudication",
    "api",  # resolved by agreeing API votes alone (feedback.label.api_votes.min_votes)
)
# The voter name of a /v1/feedback client: `api:<client>` (a CLI annotator name cannot start with it).
API_PREFIX = "api:"


def parse_answer(answer: str, taxonomy: Taxonomy, suggestions: list[str]) -> tuple[str | None, str | None]:
    """Turn one answer line into (label, note); label None means skip.

    Raises:
        ValueError: the answer is not a label the guidelines allow (the message says which are), or it
            breaks the text rules (intentops.data.text.text_problem), e.g. a stray escape sequence.
    """
    problem = text_problem(answer)
    if problem is not None:
        raise ValueError(f"the answer holds a {problem}; type it again without it")
    text, _, note = answer.partition("#")
    text, note = text.strip(), note.strip() or None
    if text.lower() in _SKIP:
        return None, note
    if text.isdigit():
        k = int(text)
        if not 1 <= k <= len(suggestions):
            raise ValueError(f"there is no suggestion {k}; choose 1-{len(suggestions)}")
        return suggestions[k - 1], note
    if text == OUT_OF_SCOPE:
        return taxonomy.oos_label or OUT_OF_SCOPE, note
    if text in (UNCLEAR, *taxonomy.labels) or text == taxonomy.oos_label:
        return text, note
    if text.startswith(NEW_PREFIX):
        name = text[len(NEW_PREFIX) :]
        if not _NEW_NAME.fullmatch(name):
            raise ValueError(f"a proposed intent is new:<snake_case_name>, got {text!r}")
        return text, note
    raise ValueError(
        f"{text!r} is not in the taxonomy: give a label, a suggestion number, {OUT_OF_SCOPE}, {UNCLEAR}, "
        f"{NEW_PREFIX}<name>, or skip"
    )


def resolve(
    votes: Mapping[str, str] | Iterable[str],
    min_annotators: int,
    adjudicated: str | None = None,
    api_min_votes: int = 0,
) -> tuple[str | None, str]:
    """The item's final label and how it was reached.

    Args:
        votes: {voter: label} (voters `api:<client>` are API votes), or the labels alone (all CLI votes).
        api_min_votes: API votes alone (no CLI vote) resolve the item when at least this many agree and none
            disagrees (a disagreement among them goes to adjudication); 0: they never do. Mixed with CLI votes
            they count like any vote.

    Returns:
        (label, method): method is `adjudicated`, `api` (API votes alone), `majority` (strict), `pending` (fewer
        than `min_annotators` votes) or `needs_adjudication` (no strict majority, or a vote `unclear`).
    """
    if adjudicated is not None:
        return adjudicated, ADJUDICATED
    if isinstance(votes, Mapping):
        api_only = bool(votes) and all(v.startswith(API_PREFIX) for v in votes)
        votes = list(votes.values())
    else:
        votes, api_only = list(votes), False
    if api_only and 0 < api_min_votes <= len(votes):
        if len(set(votes)) > 1 or UNCLEAR in votes:
            return None, NEEDS_ADJUDICATION
        return votes[0], API
    if len(votes) < min_annotators or not votes:
        return None, PENDING
    (top, n), *_ = Counter(votes).most_common(1)
    if UNCLEAR in votes or 2 * n <= len(votes):
        return None, NEEDS_ADJUDICATION
    return top, MAJORITY


def agreement(votes: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """Cohen's kappa for every pair of annotators over the items both labelled, their mean, and unanimity.

    Args:
        votes: prediction_id -> {annotator: label}.

    Returns:
        {"pairs": [{"annotators", "items", "kappa"}], "mean_kappa", "unanimous_share_by_label"};
        a pair with fewer than 2 shared items, or one label only, has kappa None (it is undefined).
    """
    from sklearn.metrics import cohen_kappa_score

    annotators = sorted({a for v in votes.values() for a in v})
    pairs = []
    for a, b in combinations(annotators, 2):
        shared = [v for v in votes.values() if a in v and b in v]
        la, lb = [v[a] for v in shared], [v[b] for v in shared]
        kappa = None
        if len(shared) >= 2 and len(set(la) | set(lb)) > 1:
            kappa = float(cohen_kappa_score(la, lb))
        pairs.append({"annotators": [a, b], "items": len(shared), "kappa": kappa})
    kappas = [p["kappa"] for p in pairs if p["kappa"] is not None]
    by_label: dict[str, list[bool]] = defaultdict(list)
    for v in votes.values():
        if len(v) >= 2:
            (top, _), *_ = Counter(v.values()).most_common(1)
            by_label[top].append(len(set(v.values())) == 1)
    return {
        "pairs": pairs,
        "mean_kappa": sum(kappas) / len(kappas) if kappas else None,
        "unanimous_share_by_label": {k: sum(u) / len(u) for k, u in sorted(by_label.items())},
    }


def load_state(
    engine: Any, count_anonymous: bool = False
) -> tuple[list[dict], dict[str, dict[str, str]], dict[str, dict[str, Any]], dict[str, dict]]:
    """(queue items, votes per item {annotator: label}, notes per item {annotator: note}, adjudications per item).

    The votes hold the CLI's annotations and, as `api:<client>`, each /v1/feedback client's latest correction
    of a queued item (its note: the request's `annotator` field); client `anonymous` only with `count_anonymous`
    (feedback.label.api_votes.anonymous).
    """
    items = store.queue_items(engine)
    votes: dict[str, dict[str, str]] = defaultdict(dict)
    notes: dict[str, dict[str, Any]] = defaultdict(dict)
    for row in store.table_rows(engine, store.annotations):
        votes[row["prediction_id"]][row["annotator"]] = row["label"]
        notes[row["prediction_id"]][row["annotator"]] = row["note"]
    for row in store.latest_corrections(engine):
        if row["in_queue"] and (count_anonymous or row["client"] != store.ANONYMOUS):
            votes[row["prediction_id"]][API_PREFIX + row["client"]] = row["label"]
            notes[row["prediction_id"]][API_PREFIX + row["client"]] = row["annotator"]
    adjudicated = {row["prediction_id"]: row for row in store.table_rows(engine, store.adjudications)}
    return items, dict(votes), dict(notes), adjudicated


def api_votes_settings(params: Any) -> tuple[int, bool]:
    """(min_votes, anonymous) of feedback.label.api_votes; (0, False), API votes never alone, when absent."""
    cfg = params.feedback.label.get("api_votes") or {}
    return int(cfg.get("min_votes", 0)), bool(cfg.get("anonymous", False))


@dataclass(frozen=True)
class Review:
    """The store's review state under the labelling settings (feedback.label): queue items, every vote (CLI and
    API), notes and adjudications. The one way callers resolve items (export, new-label count, audit, shadow)."""

    items: list[dict]
    votes: dict[str, dict[str, str]]
    notes: dict[str, dict[str, Any]]
    adjudicated: dict[str, dict]
    min_annotators: int
    api_min_votes: int
    count_anonymous: bool = False  # feedback.label.api_votes.anonymous: votes of client `anonymous` count

    def resolve(self, prediction_id: str) -> tuple[str | None, str]:
        """(final label or None, method) of one queue item; see `resolve`."""
        adj = self.adjudicated.get(prediction_id)
        votes = self.votes.get(prediction_id, {})
        return resolve(votes, self.min_annotators, adj["label"] if adj else None, self.api_min_votes)


def read_review(engine: Any, params: Any) -> Review:
    """The review state of the store behind `engine` under params.feedback.label (its schema checked)."""
    store.check_schema(engine)
    api_min_votes, anonymous = api_votes_settings(params)
    items, votes, notes, adjudicated = load_state(engine, anonymous)
    min_annotators = int(params.feedback.label.min_annotators)
    return Review(items, votes, notes, adjudicated, min_annotators, api_min_votes, anonymous)


def review_of(params: Any) -> Review:
    """The review state of the configured store (feedback.store; $INTENTOPS_DB_URL), read in one go."""
    engine = store.engine_from_params(params)
    try:
        return read_review(engine, params)
    finally:
        engine.dispose()


def review_export(
    review: Review, params: Any, desc: str | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """export_table over a Review, with the taxonomy and guideline version of `params` (`desc`: a progress bar's
    label)."""
    return export_table(
        review.items,
        review.votes,
        review.adjudicated,
        Taxonomy.read(params.paths.taxonomy),
        review.min_annotators,
        str(params.feedback.label.guideline_version),
        review.api_min_votes,
        desc,
    )


def _shown(value: Any) -> str:
    """A value from the store as the terminal shows it: non-printable characters escaped, on one line."""
    return display_text(str(value))


def _show(
    item: Mapping[str, Any], index: int, total: int, show_top_k: int, write: Callable[[str], None]
) -> list[str]:
    """Print one queue item; returns the suggestions in the order they are numbered."""
    top_k = list(item["top_k"])[:show_top_k]
    write(
        f"\n[{index}/{total}] {_shown(item['prediction_id'])}  "
        f"(model {_shown(item['model_version'])}, flagged: {_shown(item['reason'])})"
    )
    write(f"  text: {_shown(item['text'])}")
    write(f"  model suggests: {_shown(item['suggested_intent'])} ({item['confidence']:.2f})")
    for k, s in enumerate(top_k, 1):
        write(f"    {k}. {_shown(s['intent'])} {float(s['score']):.2f}")
    return [s["intent"] for s in top_k]


def label_session(
    engine: Any,
    annotator: str,
    taxonomy: Taxonomy,
    *,
    min_annotators: int,
    show_top_k: int,
    read_line: Callable[[str], str | None],
    write: Callable[[str], None],
    adjudicate: bool = False,
    limit: int | None = None,
    api_min_votes: int = 0,
    count_anonymous: bool = False,
) -> dict[str, int]:
    """Show the items this annotator should label (or adjudicate) and record the answers.

    Labelling shows items the annotator has not labelled that still wait for votes, without the other
    annotators' labels; adjudication shows items without a strict majority (or flagged unclear), with
    every vote and note, and requires a reason.

    Returns:
        counts of items `shown`, `labelled` and `skipped`.
    """
    items, votes, notes, adjudicated = load_state(engine, count_anonymous)
    todo = items_to_show(items, votes, adjudicated, annotator, min_annotators, adjudicate, api_min_votes)
    todo = todo[:limit] if limit is not None else todo
    counts = {"shown": 0, "labelled": 0, "skipped": 0}
    if not todo:
        write(f"nothing to {'adjudicate' if adjudicate else 'label'} for {_shown(annotator)}")
    for i, item in enumerate(todo, 1):
        pid = item["prediction_id"]
        suggestions = _show(item, i, len(todo), show_top_k, write)
        if adjudicate:
            for who, label in sorted(votes.get(pid, {}).items()):
                note = notes.get(pid, {}).get(who)
                write(f"  {_shown(who)}: {_shown(label)}" + (f"  # {_shown(note)}" if note else ""))
        counts["shown"] += 1
        answer = ask(taxonomy, suggestions, adjudicate, read_line, write)
        if answer is None:
            return counts
        label, note = answer
        if label is None:
            counts["skipped"] += 1
        elif adjudicate:
            counts["labelled"] += store.add_adjudication(engine, pid, annotator, label, note)
        else:
            counts["labelled"] += store.add_annotation(engine, pid, annotator, label, note)
    return counts


def items_to_show(
    items: list[dict],
    votes: Mapping,
    adjudicated: Mapping,
    annotator: str,
    min_annotators: int,
    adjudicate: bool,
    api_min_votes: int = 0,
) -> list[dict]:
    """Items waiting for this annotator's vote (not yet voted by them), or, to adjudicate, items without a
    strict majority."""
    todo = []
    for item in items:
        pid = item["prediction_id"]
        item_votes = votes.get(pid, {})
        adj = (adjudicated.get(pid) or {}).get("label")
        _, method = resolve(item_votes, min_annotators, adj, api_min_votes)
        if adjudicate and method == NEEDS_ADJUDICATION:
            todo.append(item)
        elif not adjudicate and method == PENDING and annotator not in item_votes:
            todo.append(item)
    return todo


def ask(
    taxonomy: Taxonomy,
    suggestions: list[str],
    adjudicate: bool,
    read_line: Callable[[str], str | None],
    write: Callable[[str], None],
) -> tuple[str | None, str | None] | None:
    """Read answers until one parses: (label or None to skip, note); None when the annotator quits."""
    while True:
        answer = read_line("adjudicate> " if adjudicate else "label> ")
        if answer is None or answer.strip().lower() in _QUIT:
            return None
        try:
            label, note = parse_answer(answer, taxonomy, suggestions)
            if adjudicate and label == UNCLEAR:
                raise ValueError("an adjudication decides: give a label, out_of_scope or new:<name>")
            if adjudicate and label is not None and not note:
                raise ValueError("an adjudication needs a one-line reason: <label> # <reason>")
        except ValueError as err:
            write(f"  ! {err}")
            continue
        return label, note


def export_table(
    items: list[dict],
    votes: Mapping[str, Mapping[str, str]],
    adjudicated: Mapping[str, Mapping[str, Any]],
    taxonomy: Taxonomy,
    min_annotators: int,
    guideline_version: str,
    api_min_votes: int = 0,
    desc: str | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The labelled rows ready for training (text, label + provenance) and a count of every item's status.

    A proposed intent keeps its `new:<name>` label in the export: `ingest` extends the taxonomy with it
    (status `exported`, and also counted in `proposals`). Items whose final label cannot train
    (out_of_scope without an out-of-scope class) are counted as `not_trainable`, a resolved item whose
    text an earlier item already has as `repeats`, and one whose text or label breaks the text rules
    (intentops.data.text.text_problem; ingest would refuse the file) as `bad_text`; none of these is exported.
    `desc` labels a progress bar over the items (`timing.progress`).
    """
    from intentops.data.readers import match_key

    rows, status, seen = [], Counter(), set()
    for item in progress(items, desc, unit="item"):
        pid = item["prediction_id"]
        adj = adjudicated.get(pid)
        item_votes = dict(votes.get(pid, {}))
        label, method = resolve(item_votes, min_annotators, adj["label"] if adj else None, api_min_votes)
        if label is None:
            status[method] += 1
            continue
        if text_problem(item["text"]) is not None or text_problem(label) is not None:
            status["bad_text"] += 1  # stored before the API refused such texts; ingest would refuse the file
            continue
        key = match_key(item["text"])
        if key in seen:  # the same message queued twice (sent twice): one training row is enough
            status["repeats"] += 1
            continue
        seen.add(key)
        if label.startswith(NEW_PREFIX):
            status["proposals"] += 1
        elif not taxonomy.trainable(label):
            status["not_trainable"] += 1
            continue
        status["exported"] += 1
        rows.append(export_row(item, label, method, item_votes, adj, guideline_version))
    return pd.DataFrame(rows, columns=EXPORT_COLUMNS), dict(status)


def export_row(
    item: dict, label: str, method: str, item_votes: dict, adj: Mapping | None, guideline_version: str
) -> dict[str, Any]:
    """One labels.csv row: the text, its resolved label and how it was decided (EXPORT_COLUMNS)."""
    return {
        "text": item["text"],
        "label": label,
        "prediction_id": item["prediction_id"],
        "method": method,
        "votes": json.dumps(item_votes, sort_keys=True),
        "n_annotators": len(item_votes),
        "adjudicator": adj["adjudicator"] if adj else "",
        "adjudication_reason": adj["reason"] if adj else "",
        "model_version": item["model_version"],
        "suggested_intent": item["suggested_intent"],
        "guideline_version": guideline_version,
    }


def _stdin_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str | None]:
    """input() with its prompt on a terminal; plain line reads (for scripts and tests) otherwise."""
    if stdin.isatty():

        def read(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None

        return read

    def read_piped(prompt: str) -> str | None:
        stdout.write(prompt)
        line = stdin.readline()
        if not line:
            return None
        stdout.write(display_text(line.rstrip("\n")) + "\n")  # the echo, escaped like everything shown
        return line.rstrip("\n")

    return read_piped


def _kappa_lines(stats: Mapping[str, Any]) -> list[str]:
    lines = []
    for p in stats["pairs"]:
        kappa = "undefined" if p["kappa"] is None else f"{p['kappa']:.3f}"
        a, b = (_shown(name) for name in p["annotators"])
        lines.append(f"kappa {a} vs {b}: {kappa} over {p['items']} item(s)")
    if stats["mean_kappa"] is not None:
        lines.append(
            f"mean pairwise kappa: {stats['mean_kappa']:.3f} (guidelines: review the batch below 0.6)"
        )
    return lines


def main_label(
    params: Any,
    annotator: str,
    *,
    adjudicate: bool = False,
    limit: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> dict[str, int]:
    """`intentops label`: an annotation (or adjudication) session on the configured store."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not annotator or not annotator.strip():
        raise UserError(
            "an annotator name is required", where="--annotator", fix="pass --annotator YOUR_NAME"
        )
    if (problem := text_problem(annotator)) is not None:
        raise UserError(
            f"the annotator name holds a {problem}", where="--annotator", fix="type your name again"
        )
    if annotator.strip().startswith(API_PREFIX):
        raise UserError(
            f"annotator names starting with {API_PREFIX!r} are the API's clients",
            where="--annotator",
            fix="use your own name",
        )
    engine = store.engine_from_params(params)
    try:
        store.check_schema(engine)
        taxonomy = Taxonomy.read(params.paths.taxonomy)
        api_min_votes, count_anonymous = api_votes_settings(params)

        def write(line: str) -> None:
            stdout.write(line + "\n")

        counts = label_session(
            engine,
            annotator.strip(),
            taxonomy,
            min_annotators=int(params.feedback.label.min_annotators),
            show_top_k=int(params.feedback.label.show_top_k),
            read_line=_stdin_reader(stdin, stdout),
            write=write,
            adjudicate=adjudicate,
            limit=limit,
            api_min_votes=api_min_votes,
            count_anonymous=count_anonymous,
        )
        _, votes, _, _ = load_state(engine, count_anonymous)
        write(
            f"{_shown(annotator)}: {counts['labelled']} labelled, {counts['skipped']} skipped "
            f"of {counts['shown']} shown"
        )
        for line in _kappa_lines(agreement(votes)):
            write(line)
        return counts
    finally:
        engine.dispose()


def main_export(params: Any, out: str | None = None) -> dict[str, Any]:
    """`intentops label export`: write the resolved labels as CSV and the agreement report, atomically."""
    from intentops.io import atomic_path, write_json

    out = out or params.paths.feedback_labels
    review = review_of(params)
    table, status = review_export(review, params, desc="label export")
    votes = review.votes
    stats = agreement(votes)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    write_json(params.paths.feedback_agreement, {**stats, "status": status})
    print(f"wrote {len(table)} labelled row(s) to {out}; status: {status}")
    for line in _kappa_lines(stats):
        print(line)
    return {"rows": len(table), "status": status, "agreement": stats}
