"""Every deployment's entrypoint loads the way Prefect loads it.

Prefect runs a flow file as a script under its file's name, with the file's folder first on
``sys.path``: a flow module named like one of the project's packages (``flows/ingest.py`` beside
a package ``ingest``) hides that package from the flow's own imports, and `prefect deploy` and
the worker fail while plain ``import flows.ingest`` still works.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _entrypoints() -> list[str]:
    recipe = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return [deployment["entrypoint"] for deployment in recipe["deployments"]]


def test_no_flow_module_is_named_like_a_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(config["tool"]["importlinter"]["root_packages"])
    flow_modules = {Path(entry.split(":")[0]).stem for entry in _entrypoints()}
    assert flow_modules, "prefect.yaml lists no deployment"
    # Prefect loads an entrypoint as a script with its folder first on sys.path, so any module
    # beside it (a task module the flows share too) shadows a package of the same name.
    flow_modules |= {path.stem for path in (ROOT / "flows").glob("*.py")}
    assert not flow_modules & packages


def test_every_entrypoint_loads_with_prefects_loader() -> None:
    # One fresh interpreter loading them in prefect.yaml's order, as `prefect deploy --all` does.
    script = (
        "import sys\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "for entrypoint in sys.argv[1:]:\n"
        "    print(entrypoint, load_flow_from_entrypoint(entrypoint).name)\n"
    )
    entrypoints = _entrypoints()
    done = subprocess.run(
        [sys.executable, "-c", script, *entrypoints],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(entrypoints)
