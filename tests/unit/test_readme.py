"""The README as a newcomer reads it: every environment variable the code reads is documented, and nothing in
it is a path that exists only on one machine."""

from __future__ import annotations

import re

from support import ROOT

ENV_VAR = re.compile(r"\bINTENTOPS_[A-Z0-9_]+\b")
# Where the project reads its environment: the package, the Serve entry, benchmarks and tests.
CODE_DIRS = ("src", "serving", "benchmarks", "tests")


def env_vars_in_code() -> dict[str, str]:
    """{variable: first file that names it} over the project's Python files."""
    found: dict[str, str] = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in ENV_VAR.findall(path.read_text(encoding="utf-8")):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def env_table(readme: str) -> str:
    """The README's "Environment variables" section."""
    start = readme.index("## Environment variables")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_every_env_var_the_code_reads_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(INTENTOPS_[A-Z0-9_]+)` \|", env_table(readme), re.M))
    used = env_vars_in_code()
    assert {"INTENTOPS_PARAMS", "INTENTOPS_ROOT", "INTENTOPS_ORT_THREADS"} <= set(used)
    missing = {name: where for name, where in used.items() if name not in documented}
    assert not missing, f"add these to README.md's environment-variable table: {missing}"
    stale = documented - set(used)
    assert not stale, f"README.md documents variables no code reads: {sorted(stale)}"


def test_the_readme_has_no_machine_specific_paths():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not re.findall(r"(?<![\w.])/(?:work|home|root|Users)/", readme)


def test_the_first_screen_says_what_how_long_and_how_much_disk():
    first_screen = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:24])
    assert "make run" in first_screen and "make test" in first_screen
    assert "min" in first_screen and "GB" in first_screen


def test_the_package_version_is_the_one_pyproject_declares():
    import tomllib

    import intentops

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert intentops.__version__ == declared
    assert f"## {declared}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
