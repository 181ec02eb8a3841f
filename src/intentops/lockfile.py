"""dvc.lock across machines: which outputs git carries, adopting a fresh run's lock, and comparing runs.

DVC pushes and pulls the cached outputs; the ones dvc.yaml marks `cache: false` (metrics, plots, small reports)
are not in the cache, so git carries them next to dvc.lock. A commit's lock is only true on another machine when
both travel together: `adopt` copies them from a run (a fresh clone's `make run`) into this checkout, and
`compare` prints the per-stage output hashes of several runs side by side (docs/reproducibility.md).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from intentops.errors import UserError

OUT_KINDS = ("outs", "metrics", "plots")


def _yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise UserError(f"{path.name} not found", where=str(path), fix="point at a project checkout")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def interpolate(text: str, params: dict) -> str:
    """dvc.yaml's `${a.b}` references resolved against params.yaml."""

    def value(match: re.Match) -> str:
        node: Any = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def git_outputs(root: str | Path) -> list[str]:
    """The outputs dvc.yaml marks `cache: false` (paths relative to `root`): git, not the DVC remote, carries them."""
    root = Path(root)
    params, stages = _yaml(root / "params.yaml"), _yaml(root / "dvc.yaml")["stages"]
    paths = []
    for stage in stages.values():
        for entry in (e for kind in OUT_KINDS for e in stage.get(kind) or []):
            if isinstance(entry, dict):
                ((path, opts),) = entry.items()
                if (opts or {}).get("cache") is False:
                    paths.append(interpolate(path, params))
    return paths


def adopt(run: str | Path, dest: str | Path) -> list[str]:
    """Copy `run`'s dvc.lock and the outputs git carries into `dest`, a checkout of the same pipeline.

    Returns the paths copied (dvc.lock first). Refuses a run of another dvc.yaml or params.yaml: its lock would
    not describe `dest`'s pipeline.
    """
    run, dest = Path(run), Path(dest)
    for name in ("dvc.yaml", "params.yaml"):
        if (run / name).read_bytes() != (dest / name).read_bytes():
            raise UserError(
                f"{name} differs between the run and this checkout",
                where=f"{run / name} vs {dest / name}",
                fix="adopt a run of this very commit (git clone . ../ci-check && cd ../ci-check && make run)",
            )
    copied = ["dvc.lock"]
    shutil.copy2(run / "dvc.lock", dest / "dvc.lock")
    for rel in git_outputs(run):
        src, dst = run / rel, dest / rel
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        else:
            continue
        copied.append(rel)
    return copied


def output_hashes(root: str | Path) -> dict[tuple[str, str], str | None]:
    """{(stage, output path): md5} from a checkout's dvc.lock, in the lock's stage order."""
    lock = _yaml(Path(root) / "dvc.lock").get("stages") or {}
    return {
        (stage, o["path"]): o.get("md5") for stage, entry in lock.items() for o in entry.get("outs") or []
    }


def compare(roots: Sequence[str | Path]) -> tuple[list[str], dict[str, list[str]]]:
    """Lines of a table with each output's hash in each run, and {"same": [...], "different": [...]} by path."""
    hashes = [output_hashes(r) for r in roots]
    keys = list(dict.fromkeys(k for h in hashes for k in h))
    lines = [f"{'':4} {'stage':9} {'output':38} " + " ".join(f"{Path(r).name[:12]:12}" for r in roots)]
    verdict: dict[str, list[str]] = {"same": [], "different": []}
    for stage, path in keys:
        values = [h.get((stage, path)) for h in hashes]
        same = len(set(values)) == 1 and values[0] is not None
        verdict["same" if same else "different"].append(path)
        cells = " ".join(f"{(v or '-')[:12]:12}" for v in values)
        lines.append(f"{'same' if same else 'DIFF':4} {stage:9} {path:38} {cells}")
    return lines, verdict
