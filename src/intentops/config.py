"""Load the composed parameters (params.yaml) and compose them from conf/ with Hydra."""

from __future__ import annotations

import os
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


def write_params(out: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Path:
    """Compose conf/ and write it to `out` the way `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    root = repo_root()
    compose_and_dump(Path(out), str(root / "conf"), None, "config", str(root), list(overrides or []))
    return Path(out)
