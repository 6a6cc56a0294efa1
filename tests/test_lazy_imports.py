"""The light flows' modules import none of the heavy libraries.

A deployment run is a fresh process that imports its flow's module (and its parents) before
the flow does anything; label-sync and check-and-retrain do a few hundred milliseconds of
work, so seconds of imports they never use would dominate every run. Each module is imported
in a fresh interpreter, as the worker's flow-run process does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "ultralytics",
    "label_studio_sdk.client",  # the SDK's LabelStudio: label interface, jsf, smart_open
    "label_studio_sdk.label_interface",
    "evidently",
    "mlflow",
    "cv2",
    "pandas",
    "boto3",
    "alembic",
)
LIGHT = (
    "flows",
    "flows.label_sync",
    "flows.check_retrain",
    "visionloop.settings",
    "visionloop.db",
    "labeling.sync",
    "training.trainer",
    "training.evaluation",
)


def modules_after_import(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_imports_nothing_heavy(module: str) -> None:
    loaded = modules_after_import(module)
    assert module in loaded
    assert [name for name in HEAVY if name in loaded] == []


def test_the_label_studio_client_is_built_without_the_sdks_projects_extension() -> None:
    """label-sync's client keeps the SDK's tasks extension (its pager ends quietly on the 404
    Label Studio answers past the last page) without loading the projects extension."""
    code = (
        "import json, sys\n"
        "from labeling.provision import client\n"
        "ls = client('http://127.0.0.1:9', 'token')\n"
        "tasks, projects, users = ls.tasks, ls.projects, ls.users\n"
        "print(json.dumps([type(tasks).__name__, [c.__name__ for c in type(projects).__mro__],"
        " 'label_studio_sdk.client' in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    tasks, projects_mro, heavy_loaded = json.loads(result.stdout.splitlines()[-1])
    assert tasks == "TasksClientExt"
    assert "ProjectsClient" in projects_mro
    assert heavy_loaded is False
