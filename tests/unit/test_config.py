"""conf/ is the source of truth: params.yaml must equal its composition, and dvc.yaml must resolve against it."""

import re

import yaml
from omegaconf import OmegaConf

from intentops.config import compose
from support import ROOT


def test_params_yaml_equals_composition_of_conf():
    composed = OmegaConf.to_container(compose(config_dir=ROOT / "conf"))
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == composed, "params.yaml is stale: run `make params` and commit it"


def test_dvc_yaml_interpolations_and_params_exist():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for ref in re.findall(r"\$\{([^}]+)\}", yaml.safe_dump(dvc)):
        node = params
        for part in ref.split("."):
            assert part in node, f"dvc.yaml refers to ${{{ref}}}, missing from params.yaml"
            node = node[part]
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            key = key if isinstance(key, str) else next(iter(key))
            assert key.split(".")[0] in params, (
                f"stage {name} lists params key {key!r} that params.yaml lacks"
            )


def test_each_stage_has_its_module_and_params_key():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = f"intentops.stages.{name}"
        assert stage["cmd"].split() == ["python", "-m", module], (
            f"stage {name} should run its own module {module}"
        )
        assert (ROOT / "src" / "intentops" / "stages" / f"{name}.py").is_file()
