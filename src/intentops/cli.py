"""The `intentops` command: user-facing verbs that are not DVC stages."""

from __future__ import annotations

import argparse

from intentops.errors import cli_entry


def _params(args: argparse.Namespace) -> None:
    from intentops.config import write_params

    out = write_params(args.out, args.overrides)
    print(f"wrote {out} from conf/ (overrides: {args.overrides or 'none'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intentops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="compose conf/ into params.yaml, as `dvc exp run` does")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=clinc150")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=_params)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
