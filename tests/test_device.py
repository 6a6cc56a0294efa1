"""VISIONLOOP_DEVICE: where training, evaluation and export run (auto | cpu | cuda:N).

That a real tracked training logs the device it used is checked in test_bootstrap.py, which
trains anyway.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training.trainer import resolve_device
from visionloop.settings import Settings


def settings_with(monkeypatch: pytest.MonkeyPatch, value: str) -> Settings:
    monkeypatch.setenv("VISIONLOOP_DEVICE", value)
    return Settings(_env_file=None)


def test_auto_by_default() -> None:
    assert Settings(_env_file=None).device == "auto"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("auto", "auto"),
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        ("cuda:0", "cuda:0"),
        (" cuda:3 ", "cuda:3"),
    ],
)
def test_accepted_values(monkeypatch: pytest.MonkeyPatch, value: str, parsed: str) -> None:
    assert settings_with(monkeypatch, value).device == parsed


@pytest.mark.parametrize("value", ["gpu", "cuda", "cuda:", "cuda:x", "0", "cuda:0,1", "mps", ""])
def test_other_values_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    with pytest.raises(ValidationError, match=r"VISIONLOOP_DEVICE must be auto, cpu or cuda:N"):
        settings_with(monkeypatch, value)


def test_auto_takes_the_first_gpu_torch_sees_else_the_cpu() -> None:
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_a_gpu_torch_does_not_see_is_refused() -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"VISIONLOOP_DEVICE=cuda:{count} .* {count} CUDA"):
        resolve_device(f"cuda:{count}")
    if count:
        assert resolve_device(f"cuda:{count - 1}") == f"cuda:{count - 1}"


def test_training_and_evaluation_default_to_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that pass no device (the demo, benchmarks) follow VISIONLOOP_DEVICE too."""
    from training.trainer import settings_device
    from visionloop.settings import get_settings

    monkeypatch.setenv("VISIONLOOP_DEVICE", "cpu")
    get_settings.cache_clear()
    try:
        assert settings_device() == "cpu"
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        monkeypatch.setenv("VISIONLOOP_DEVICE", f"cuda:{count}")
        get_settings.cache_clear()
        with pytest.raises(ValueError, match="VISIONLOOP_DEVICE"):
            settings_device()
    finally:
        get_settings.cache_clear()
