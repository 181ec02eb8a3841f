"""The `intentops` command: user-facing verbs that are not DVC stages."""

from __future__ import annotations

import argparse
import os

from intentops.errors import cli_entry


def _params(args: argparse.Namespace) -> None:
    from intentops.config import write_params

    out = write_params(args.out, args.overrides)
    print(f"wrote {out} from conf/ (overrides: {args.overrides or 'none'})")


def build_parser() -> argparse.ArgumentParser:  # long: one declaration per subcommand, read top to bottom
    parser = argparse.ArgumentParser(prog="intentops", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "predict",
        help="predict every row of a CSV, Parquet or JSON-lines file with a bundle (default: production); "
        "writes the rows with intent, confidence, out_of_scope, reason, needs_review and top_k",
    )
    p.add_argument("input", help="the table to predict (.csv, .parquet, .jsonl)")
    p.add_argument("-o", "--output", required=True, help="where to write it (.csv, .parquet, .jsonl)")
    p.add_argument("--text-column", default="text", help="the column holding the texts (default: text)")
    p.add_argument("--bundle", help="a bundle folder (default: the registry's production model)")
    p.add_argument(
        "--batch-size", type=int, default=256, help="rows per Predictor.predict call (default: 256)"
    )
    p.add_argument("--top-k", type=int, default=3, help="intents listed in top_k (default: 3)")
    p.add_argument("--prefix", default="", help="prefix of the added column names (default: none)")
    _registry_option(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("params", help="compose conf/ into params.yaml, as `dvc exp run` does")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=clinc150")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=_params)

    p = sub.add_parser(
        "drift-check",
        help="compare the latest profile windows with the reference and estimate their accuracy without labels; "
        "exit 0 = nothing triggered, 10 = feature drift, 13 = estimated accuracy dropped more than "
        "monitor.performance.max_drop (no feature drift), 2 = error; with --retrain: 0 = nothing triggered or "
        "a new model promoted, 11 = too few new labels, 12 = not promoted",
    )
    p.add_argument("--reference", help="reference profile (default: paths.monitoring_reference)")
    p.add_argument(
        "--profiles", help="folder or fsspec URL of profile windows (default: paths.monitoring_profiles)"
    )
    p.add_argument(
        "--last-n", type=int, help="how many latest windows to merge (default: monitor.drift.last_n)"
    )
    p.add_argument(
        "--dispatch",
        action="store_true",
        help="on drift or an accuracy drop, send the drift-detected repository_dispatch",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="on drift or an accuracy drop, with at least monitor.retrain.min_new_labels new reviewed labels: "
        "export them, "
        "dvc repro, gate, promote (and with --serve-url wait for the hot swap)",
    )
    p.add_argument(
        "--serve-url", help="with --retrain: the running API (e.g. http://127.0.0.1:8000) to watch swap"
    )
    p.set_defaults(func=_drift_check)

    p = sub.add_parser(
        "drift-reference", help="build the training vocabulary and reference profile from the split"
    )
    p.add_argument(
        "--bundle",
        help="also profile this model bundle's outputs on val (the `profile` stage uses "
        "paths.bundle_dir); without it, text features only",
    )
    p.set_defaults(func=_drift_reference)

    p = sub.add_parser(
        "label", help="label review-queue items (answers from stdin when it is not a terminal)"
    )
    p.add_argument("--annotator", help="your name, recorded with each label")
    p.add_argument("--adjudicate", action="store_true", help="decide items without a strict majority")
    p.add_argument("--limit", type=int, help="stop after this many items")
    p.set_defaults(func=_label)
    label_sub = p.add_subparsers(dest="label_command")
    e = label_sub.add_parser("export", help="write the resolved labels as CSV (paths.feedback_labels)")
    e.add_argument("--out", help="CSV path (default: paths.feedback_labels)")
    e.set_defaults(func=_label_export)

    p = sub.add_parser(
        "labels", help="the reviewed labels' DVC pointer: publish (exit 11 = too few new), restore, receive"
    )
    labels_sub = p.add_subparsers(dest="labels_command", required=True)
    labels_sub.add_parser(
        "publish",
        help="check monitor.retrain.min_new_labels (exit 11 below it), export, dvc add, dvc push when a "
        "remote is configured; prints the pointer as JSON",
    ).set_defaults(func=_labels, action="publish")
    labels_sub.add_parser(
        "restore",
        help="bring back a missing paths.feedback_labels: header-only when its pointer names that, else dvc pull",
    ).set_defaults(func=_labels, action="restore")
    labels_sub.add_parser(
        "receive",
        help="CI (retrain.yml): write the pointer from $LABELS_POINTER, pull it, count the new labels; sets "
        "the step output retrain=true/false",
    ).set_defaults(func=_labels, action="receive")

    p = sub.add_parser("lock", help="dvc.lock across machines: adopt a fresh run's lock, compare runs")
    lock_sub = p.add_subparsers(dest="lock_command", required=True)
    r = lock_sub.add_parser(
        "adopt",
        help="copy a run's dvc.lock and the outputs git carries (dvc.yaml's cache: false) into this checkout",
    )
    r.add_argument("run", help="the run's checkout, e.g. ../ci-check after `make run` there")
    r.set_defaults(func=_lock, action="adopt")
    r = lock_sub.add_parser(
        "compare", help="each stage output's hash in each run, side by side; exit 1 if any differs"
    )
    r.add_argument("runs", nargs="+", help="checkouts whose dvc.lock to compare")
    r.set_defaults(func=_lock, action="compare")

    p = sub.add_parser("db", help="feedback database administration")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create or migrate the schema").set_defaults(func=_db_upgrade)

    p = sub.add_parser("queue", help="review queue maintenance")
    queue_sub = p.add_subparsers(dest="queue_command", required=True)
    q = queue_sub.add_parser("prune", help="delete items and feedback older than the retention")
    q.add_argument("--days", type=int, help="retention in days (default: feedback.store.retention_days)")
    q.set_defaults(func=_queue_prune)

    p = sub.add_parser("rollback", help="point production back at the previous (or a named) registry version")
    p.add_argument(
        "--to", metavar="VERSION", help="the version to restore (default: the one before the current)"
    )
    _registry_option(p)
    p.set_defaults(func=_rollback)

    p = sub.add_parser(
        "registry",
        help="the model registry (paths.registry_dir, or $INTENTOPS_REGISTRY_URL: a folder or s3://...)",
    )
    reg_sub = p.add_subparsers(dest="registry_command", required=True)
    r = reg_sub.add_parser("list", help="versions, production and candidate marked, and the event history")
    _registry_option(r)
    r.set_defaults(func=_registry_list)
    r = reg_sub.add_parser("card", help="print a registered version's model card (model_card.md), verified")
    r.add_argument("version", nargs="?", help="the version (default: production)")
    _registry_option(r)
    r.set_defaults(func=_registry_card)
    r = reg_sub.add_parser(
        "stage", help="upload a bundle (verified: content hash = version) and record it as the candidate"
    )
    r.add_argument("bundle", help="an exported bundle folder, e.g. models/bundle")
    r.add_argument("--reason", default="staged by hand")
    _registry_option(r)
    r.set_defaults(func=_registry_stage)
    r = reg_sub.add_parser(
        "promote", help="move production to a version (default: the staged candidate); replicas swap to it"
    )
    r.add_argument("version", nargs="?", help="the version (default: the candidate)")
    r.add_argument(
        "--gate", help="promote the challenger of this gate file (reports/promote/gate.json), if it passed"
    )
    r.add_argument("--reason", default="promoted by hand")
    _registry_option(r)
    r.set_defaults(func=_registry_promote)
    p = sub.add_parser("shadow", help="the shadow challenger's live figures (serving.shadow)")
    shadow_sub = p.add_subparsers(dest="shadow_command", required=True)
    r = shadow_sub.add_parser(
        "report",
        help="print as JSON the figures of a (champion, challenger) pair: rows, agreement, confidences, "
        "challenger latency, accuracy on labelled texts (default pair: production and the candidate)",
    )
    r.add_argument("--champion", help="the champion version (default: the registry's production)")
    r.add_argument("--challenger", help="the challenger version (default: the registry's candidate)")
    _registry_option(r)
    r.set_defaults(func=_shadow_report)
    p = sub.add_parser(
        "deploy-config",
        help="write serving/cluster.yaml and deploy/rayservice.yaml's serveConfigV2 from serving/config.yaml "
        "and serving/cluster.overlay.yaml",
    )
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    p.add_argument("--root", default=".", help="the repository root (default: .)")
    p.set_defaults(func=_deploy_config)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("intentops")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _predict(args: argparse.Namespace) -> None:
    from intentops.inference.batch import predict_file, production_bundle
    from intentops.inference.predictor import Predictor

    def load() -> Predictor:
        return Predictor.load(args.bundle or production_bundle(_registry(args)))

    rows = predict_file(
        load,
        args.input,
        args.output,
        text_column=args.text_column,
        batch_size=args.batch_size,
        top_k=args.top_k,
        prefix=args.prefix,
    )
    print(f"wrote {rows} rows to {args.output}")


def _deploy_config(args: argparse.Namespace) -> None:
    import sys

    from intentops.deploy import main as deploy_main

    code = deploy_main([*(["--check"] if args.check else []), "--root", args.root])
    if code:
        sys.exit(code)


def _drift_check(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.errors import UserError
    from intentops.monitor import drift

    if args.serve_url and not args.retrain:
        raise UserError(
            "--serve-url only applies with --retrain",
            where="intentops drift-check --serve-url",
            fix="add --retrain, or drop --serve-url",
        )
    drift.main(
        load_params(),
        reference=args.reference,
        profiles=args.profiles,
        last_n=args.last_n,
        dispatch=args.dispatch,
        retrain=args.retrain,
        serve_url=args.serve_url,
    )


def _drift_reference(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.monitor.profiles import write_reference

    p = load_params()
    write_reference(
        p.paths.train,
        p.paths.val,
        p.paths.monitoring_vocab,
        p.paths.monitoring_reference,
        int(p.monitor.features.vocab_min_count),
        args.bundle,
    )
    print(f"wrote {p.paths.monitoring_vocab} and {p.paths.monitoring_reference}")


def _label(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.label import main_label

    main_label(load_params(), args.annotator, adjudicate=args.adjudicate, limit=args.limit)


def _label_export(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.label import main_export

    main_export(load_params(), args.out)


def _labels(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback import publish

    {"publish": publish.main_publish, "restore": publish.main_restore, "receive": publish.main_receive}[
        args.action
    ](load_params())


def _lock(args: argparse.Namespace) -> None:
    import json
    import sys

    from intentops import lockfile

    if args.action == "adopt":
        for path in lockfile.adopt(args.run, "."):
            print(f"adopted {path}")
        return
    lines, verdict = lockfile.compare(args.runs)
    print("\n".join(lines))
    print(json.dumps({"runs": args.runs, "different": verdict["different"], "same": len(verdict["same"])}))
    if verdict["different"]:
        sys.exit(1)


def _db_upgrade(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.store import main_upgrade

    main_upgrade(load_params())


def _queue_prune(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.store import main_prune

    main_prune(load_params(), args.days)


def _registry_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        metavar="URL",
        help="the registry (default: $INTENTOPS_REGISTRY_URL, else paths.registry_dir in params.yaml)",
    )


def _registry(args: argparse.Namespace):
    from intentops.inference.registry import REGISTRY_ENV, Registry, registry_url

    if args.registry or os.environ.get(REGISTRY_ENV):
        return Registry.at(args.registry or registry_url(""))
    from intentops.config import load_params

    return Registry.at(registry_url(load_params().paths.registry_dir))


def _rollback(args: argparse.Namespace) -> None:
    registry = _registry(args)
    before = registry.production()
    print(f"production: {before} -> {registry.rollback(args.to)}")


def _registry_list(args: argparse.Namespace) -> None:
    registry = _registry(args)
    state, versions = registry.state(), registry.versions()
    pointer = registry.production()
    print(f"registry: {registry.url}")
    for version in versions:
        mark = "*" if version == state.production else "c" if version == state.candidate else " "
        print(f"{mark} {version}")
    if state.production and state.production not in versions:
        print(f"! production {state.production} is not in the registry")
    if pointer != state.production:
        print(
            f"! the pointer says {pointer}, the newest event {state.production}: the next promotion rewrites it"
        )
    for e in state.events:
        print(
            f"  {e.get('seq', 0):>4} {e.get('time', '?')}  {e.get('event', '?'):<9} {e['version']}  "
            f"(production was {e.get('previous')}): {e.get('reason', '')}"
        )


def _registry_card(args: argparse.Namespace) -> None:
    from intentops.errors import UserError

    registry = _registry(args)
    version = args.version or registry.production()
    if not version:
        raise UserError(
            "no version named and no production model yet",
            where=registry.url,
            fix="name one of the versions `intentops registry list` shows",
        )
    print(registry.model_card(version), end="")


def _registry_stage(args: argparse.Namespace) -> None:
    from pathlib import Path

    from intentops.errors import UserError
    from intentops.inference.bundle import verify_bundle

    version = verify_bundle(Path(args.bundle)).get("version")
    if not version:
        raise UserError(
            "the bundle has no content version", where=args.bundle, fix="stage an exported (ONNX) bundle"
        )
    event = _registry(args).stage(args.bundle, version, args.reason)
    print(f"candidate: {version} (event {event['seq']})")


def _registry_promote(args: argparse.Namespace) -> None:
    registry = _registry(args)
    version, reason = args.version, args.reason
    if args.gate:
        version, reason = _gate_version(args.gate, args.version)
    before = registry.production()
    _shadow_gate(args, before, version or registry.state().candidate)
    event = registry.promote(version, reason)
    print(f"production: {before} -> {event['version']} (event {event['seq']})")


def _optional_params():
    """params.yaml when there is one (promote also runs with --registry alone, e.g. from a CI checkout)."""
    from intentops.config import PARAMS_ENV, load_params

    path = os.environ.get(PARAMS_ENV) or "params.yaml"
    return load_params(path) if os.path.isfile(path) else None


def _shadow_gate(args: argparse.Namespace, champion: str | None, challenger: str | None) -> None:
    """The shadow figures of (production, the version to promote), written beside the gate; promote.shadow."""
    from pathlib import Path

    from intentops.feedback import shadow

    params = _optional_params()
    gate_file = args.gate or (
        params.paths.promote_gate if params is not None else "reports/promote/gate.json"
    )
    if champion and challenger and champion != challenger:
        shadow.gate(params, champion, challenger, Path(gate_file).with_name("shadow.json"))


def _shadow_report(args: argparse.Namespace) -> None:
    import json

    from intentops.feedback import shadow

    champion, challenger = args.champion, args.challenger
    if not (champion and challenger):
        state = _registry(args).state()
        champion, challenger = champion or state.production, challenger or state.candidate
    empty = {"champion": champion, "challenger": challenger, "rows": 0}
    if not (champion and challenger):
        print(
            json.dumps({**empty, "note": "no (production, candidate) pair: stage a candidate or name both"})
        )
        return
    figs = shadow.pair_figures(_optional_params(), champion, challenger)
    print(json.dumps(figs or {**empty, "note": "no store to read (paths.feedback_db or $INTENTOPS_DB_URL)"}))


def _gate_version(gate_file: str, version: str | None) -> tuple[str, str]:
    """The challenger a gate file promoted, and its reasons; refuses a gate that did not pass."""
    import json
    from pathlib import Path

    from intentops.errors import UserError

    try:
        gate = json.loads(Path(gate_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the gate: {err}", where=gate_file, fix="run the promote stage") from err
    challenger = gate.get("challenger")
    if gate.get("promoted") is not True or not challenger:
        raise UserError(
            "the gate did not promote its challenger",
            where=gate_file,
            fix="nothing to roll out; see its reasons",
        )
    if version and version != challenger:
        raise UserError(
            f"the gate promoted {challenger}, not {version}", where=gate_file, fix="name the gate's version"
        )
    return challenger, "; ".join(gate.get("reasons") or ["passed the gate"])


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
