"""The `intentops` command: user-facing verbs that are not DVC stages."""

from __future__ import annotations

import argparse

from intentops.errors import cli_entry


def _params(args: argparse.Namespace) -> None:
    from intentops.config import write_params

    out = write_params(args.out, args.overrides)
    print(f"wrote {out} from conf/ (overrides: {args.overrides or 'none'})")


def build_parser() -> argparse.ArgumentParser:  # long: one declaration per subcommand, read top to bottom
    parser = argparse.ArgumentParser(prog="intentops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="compose conf/ into params.yaml, as `dvc exp run` does")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=clinc150")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=_params)

    p = sub.add_parser(
        "drift-check",
        help="compare the latest profile windows with the reference; exit 0 = no drift, 10 = drift, 2 = error; "
        "with --retrain: 0 = no drift or a new model promoted, 11 = too few new labels, 12 = not promoted",
    )
    p.add_argument("--reference", help="reference profile (default: paths.monitoring_reference)")
    p.add_argument(
        "--profiles", help="folder or fsspec URL of profile windows (default: paths.monitoring_profiles)"
    )
    p.add_argument(
        "--last-n", type=int, help="how many latest windows to merge (default: monitor.drift.last_n)"
    )
    p.add_argument(
        "--dispatch", action="store_true", help="on drift, send the drift-detected repository_dispatch"
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="on drift with at least monitor.retrain.min_new_labels new reviewed labels: export them, "
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
    p.set_defaults(func=_rollback)

    p = sub.add_parser("registry", help="the model registry (paths.registry_dir)")
    reg_sub = p.add_subparsers(dest="registry_command", required=True)
    reg_sub.add_parser(
        "list", help="versions, the production one marked, and the promotion history"
    ).set_defaults(func=_registry_list)
    return parser


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


def _db_upgrade(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.store import main_upgrade

    main_upgrade(load_params())


def _queue_prune(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.feedback.store import main_prune

    main_prune(load_params(), args.days)


def _rollback(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.inference.registry import Registry

    registry = Registry.at(load_params().paths.registry_dir)
    before = registry.production()
    print(f"production: {before} -> {registry.rollback(args.to)}")


def _registry_list(args: argparse.Namespace) -> None:
    from intentops.config import load_params
    from intentops.inference.registry import Registry

    registry = Registry.at(load_params().paths.registry_dir)
    production = registry.production()
    for version in registry.versions():
        print(f"{'*' if version == production else ' '} {version}")
    if production and production not in registry.versions():
        print(f"! production {production} is not present locally")
    for event in registry.history():
        print(
            f"  {event['time']}  {event['event']:<8} {event['version']}  (was {event['previous']}): {event['reason']}"
        )


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
