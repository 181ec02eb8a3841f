"""Load the composed parameters (params.yaml) and compose them from conf/ with Hydra."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from intentops.errors import UserError

PARAMS_ENV = "INTENTOPS_PARAMS"
# The API key(s) the HTTP API requires, comma-separated (a rotation accepts old and new); unset = no auth.
API_KEY_ENV = "INTENTOPS_API_KEY"
DEFAULT_PARAMS = "params.yaml"


def repo_root() -> Path:
    """The project root: the nearest parent of the working directory that holds conf/config.yaml."""
    here = Path.cwd().resolve()
    for cand in (here, *here.parents):
        if (cand / "conf" / "config.yaml").is_file():
            return cand
    return here


def load_params(path: str | os.PathLike | None = None) -> DictConfig:
    """Read the composed parameters that DVC stages run with.

    Args:
        path: a params file; defaults to $INTENTOPS_PARAMS, then ./params.yaml.
    """
    path = Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)
    if not path.is_file():
        raise UserError(
            f"parameters file not found: {path}",
            where=str(path.resolve()),
            fix="run from the project root, or run `make params` to compose it from conf/",
        )
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers
        raise UserError(f"cannot parse parameters: {err}", where=str(path), fix="run `make params`") from err


def compose(overrides: list[str] | None = None, config_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose conf/ exactly as DVC's Hydra composition does (resolved, no `hydra` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir or repo_root() / "conf").resolve()
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as err:
        raise UserError(
            f"invalid configuration override: {err}",
            where=f"{config_dir} with overrides {list(overrides or [])}",
            fix="check the group and key names against conf/ (e.g. data=clinc150, split.val_fraction=0.2)",
        ) from err
    OmegaConf.resolve(cfg)
    return cfg


def check_stage_args(stage: str, doc: str | None, argv: Sequence[str] | None = None) -> None:
    """A stage's command line (`python -m intentops.stages.<stage>`): it takes no arguments, only params.yaml.

    `--help` prints the stage's purpose (the first paragraph of `doc`, its module docstring) and the params.yaml
    keys it reads (its `params:` in dvc.yaml, read now, so the two cannot disagree), then exits 0. Any other
    argument exits 2 with a hint to change settings with `dvc exp run -S`. No arguments: returns, and the stage
    runs.

    Args:
        argv: the arguments (default: sys.argv[1:]).
    """
    import argparse
    import inspect

    keys = stage_params(stage)
    override = f"dvc exp run -S {example_override(stage, keys)}"
    listed = ", ".join(keys) if keys is not None else f"(no stage {stage!r} in {repo_root() / 'dvc.yaml'})"
    parser = argparse.ArgumentParser(
        prog=f"python -m intentops.stages.{stage}",
        description=inspect.cleandoc(doc or "").split("\n\n")[0],
        epilog=f"params.yaml keys it reads (dvc.yaml, stages.{stage}.params):\n  {listed}\n\n"
        "It takes no arguments: `dvc repro` runs it with params.yaml. To change a setting for one experiment:\n"
        f"  {override}\nor change conf/ for good (params.yaml is composed from it).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}\n"
            f"A stage takes no arguments, only params.yaml; change a setting with `{override}` (keys: --help)"
        )


def stage_params(stage: str) -> list[str] | None:
    """The params.yaml keys a stage reads: its `params:` list in the project's dvc.yaml; None if it has none there."""
    import yaml

    path = repo_root() / "dvc.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    keys: list[str] = []
    for entry in spec.get("params") or []:
        # An entry is a key of params.yaml, or {other_file: [keys]}.
        keys += [entry] if isinstance(entry, str) else [f"{f}:{k}" for f, ks in entry.items() for k in ks]
    return keys


def example_override(stage: str, keys: list[str] | None) -> str:
    """A `-S key=value` for the stage's own params key (else its first): a numeric setting, at its current value."""
    keys = [k for k in keys or [] if ":" not in k]
    params_file = Path(os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)
    try:
        params = OmegaConf.load(params_file) if params_file.is_file() else None
    except Exception:  # an unreadable params.yaml only costs the hint its real value
        params = None
    for key in sorted(keys, key=lambda k: k != stage) if params is not None else []:
        node = OmegaConf.select(params, key)
        for path, value in _leaves(key, OmegaConf.to_container(node) if OmegaConf.is_config(node) else node):
            if isinstance(value, int | float) and not isinstance(value, bool):
                return f"{path}={value}"
    return f"{keys[0] if keys else stage}.<key>=<value>"


def _leaves(prefix: str, node) -> list[tuple[str, object]]:
    """(dotted key, value) of every scalar under `node`, depth first."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [] if isinstance(node, list) else [(prefix, node)]


def write_params(out: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Path:
    """Compose conf/ and write it to `out` the way `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    root = repo_root()
    compose_and_dump(Path(out), str(root / "conf"), None, "config", str(root), list(overrides or []))
    return Path(out)
