"""The package's pins: every conda env of the workflow pins what pyproject.toml pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def _requirement(line: str) -> tuple[str, str]:
    name, spec = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", line.strip()).groups()
    return name.lower().replace("_", "-"), spec.strip()


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(_requirement(r) for r in project["dependencies"])


@pytest.mark.parametrize("env", sorted(p.name for p in (REPO / "envs").glob("*.yaml")))
def test_conda_envs_pin_what_pyproject_pins(env):
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
    pip_lists = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_lists, f"envs/{env} has no pip section"
    pins = _pyproject_pins()
    for line in pip_lists[0]:
        name, version = _requirement(line)
        assert name in pins, f"envs/{env} installs {name}, which pyproject.toml does not list"
        assert version == pins[name], (
            f"envs/{env} pins {name}{version}, pyproject.toml {name}{pins[name]}"
        )


def test_version_is_the_packages_and_help_is_plain_text(capsys):
    from scllm import __version__
    from scllm.cli import main

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"scllm {version}"
    for command in ([], ["embed"], ["build-census"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        assert text.startswith("usage: scllm") and "``" not in text, text
