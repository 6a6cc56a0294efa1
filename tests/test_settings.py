"""Settings parsing: a first run needs no configuration; every knob comes from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from visionloop.settings import SECRETS_FILE, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for key in list(os.environ):
        if key.startswith("VISIONLOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env from the caller's folder
    return tmp_path


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    s = load_settings()
    assert s.data_dir == (tmp_path / ".visionloop").resolve()
    assert s.db_url == f"sqlite:///{s.data_dir / 'visionloop.db'}"
    assert s.s3_host == "127.0.0.1:8333"
    assert s.mlflow_uri == "http://127.0.0.1:5000"
    assert s.prefect_api == "http://127.0.0.1:4200/api"
    assert s.label_studio == "http://127.0.0.1:8080"
    assert s.class_names == ["scratch", "dent", "stain"]
    assert (s.uncertainty_low, s.uncertainty_high) == (0.4, 0.7)
    assert (s.drift_yellow, s.drift_red) == (0.3, 0.7)
    assert len(set(s.all_buckets)) == 6
    # No secret has a value baked into the code.
    assert s.s3_secret_key.get_secret_value() == ""
    assert s.api_token.get_secret_value() == ""
    assert s.label_studio_password.get_secret_value() == ""


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONLOOP_DATABASE_URL", "postgresql://u:p@db:5432/vl")
    monkeypatch.setenv("VISIONLOOP_CLASS_NAMES", "crack, hole ,rust")
    monkeypatch.setenv("VISIONLOOP_S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("VISIONLOOP_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("VISIONLOOP_PREFECT_PORT", "4300")
    monkeypatch.setenv("VISIONLOOP_CORS_ORIGINS", "http://a.example,http://b.example")
    monkeypatch.setenv("VISIONLOOP_DRIFT_RED", "0.8")
    s = load_settings()
    assert s.db_url == "postgresql://u:p@db:5432/vl"
    assert s.class_names == ["crack", "hole", "rust"]
    assert s.s3_url == "http://minio:9000"
    assert s.mlflow_uri == "http://mlflow:5000"
    assert s.prefect_api == "http://127.0.0.1:4300/api"
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.drift_red == 0.8


def test_dotenv_and_generated_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / SECRETS_FILE).write_text(
        "VISIONLOOP_API_TOKEN=from-secrets\nVISIONLOOP_S3_SECRET_KEY=s3-generated\n"
    )
    (tmp_path / ".env").write_text(
        f"VISIONLOOP_DATA_DIR={data_dir}\nVISIONLOOP_S3_SECRET_KEY=s3-from-dotenv\n"
    )
    s = load_settings()
    assert s.data_dir == data_dir.resolve()
    assert s.api_token.get_secret_value() == "from-secrets"
    assert s.s3_secret_key.get_secret_value() == "s3-from-dotenv"  # .env beats generated
    monkeypatch.setenv("VISIONLOOP_API_TOKEN", "from-env")
    assert load_settings().api_token.get_secret_value() == "from-env"  # environment beats both


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("VISIONLOOP_UNCERTAINTY_LOW", "0.9", "VISIONLOOP_UNCERTAINTY_LOW"),
        ("VISIONLOOP_DRIFT_YELLOW", "0.95", "VISIONLOOP_DRIFT_YELLOW"),
        ("VISIONLOOP_CLASS_NAMES", "a,b,a", "duplicates"),
        ("VISIONLOOP_CLASS_NAMES", " , ", "at least one class"),
        ("VISIONLOOP_API_PORT", "70000", "outside 1-65535"),
        ("VISIONLOOP_PREFECT_PORT", "not-a-port", "integer"),
    ],
)
def test_bad_values_are_rejected_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, message: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert message in str(info.value)


def test_cli_names_the_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.app import app
    from visionloop.settings import get_settings

    monkeypatch.setenv("VISIONLOOP_API_PORT", "99999")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["status"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "VISIONLOOP_API_PORT" in result.output
