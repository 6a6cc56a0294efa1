"""Every knob of the platform, read once from the environment (prefix ``VISIONLOOP_``) or ``.env``.

A first run needs no configuration: every default points at the local stack that
``visionloop up`` starts under ``data_dir``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("scratch", "dent", "stain")
"""The detector's classes when ``VISIONLOOP_CLASS_NAMES`` is not set (the synthetic generator's
first three defect shapes)."""

# Review selection defaults, shared by the settings and ``labeling.selection.SelectionPolicy``.
UNCERTAINTY_LOW = 0.4
"""A box at or above this confidence (and below ``UNCERTAINTY_HIGH``) is uncertain."""
UNCERTAINTY_HIGH = 0.7
"""Every box at or above this confidence: the image is confident."""
LABELING_BUDGET = 50
"""Images queued for review per selection cycle."""
AUDIT_RATE = 0.02
"""Share of confident images sent for review anyway (where a silent failure hides)."""
CONTROL_RATE = 0.10
"""Share of each cycle's budget drawn uniformly at random: the control arm of the ledger."""
CANDIDATE_CONF = 0.01
"""Boxes from here up to the display threshold are kept for scoring: what the model almost saw."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VISIONLOOP_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # --- where local state lives -------------------------------------------------------
    data_dir: Path = Field(
        default=Path(".visionloop"),
        description="All local state: databases, object-store volume, logs, PID files.",
    )
    project_dir: Path = Field(
        default=Path(__file__).resolve().parents[1],
        description="The code the flows run from (prefect.yaml's working directory).",
    )
    tools_dir: Path = Field(
        default=Path.home() / ".cache" / "visionloop",
        description="Installed helper tools (Label Studio's own virtualenv), shared by data dirs.",
    )

    # --- platform database -------------------------------------------------------------
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite at <data_dir>/visionloop.db.",
    )

    # --- object store (S3 API) ---------------------------------------------------------
    s3_endpoint: str = Field(
        default="", description="host:port of the S3 API; empty means the local SeaweedFS."
    )
    s3_access_key: str = Field(default="visionloop")
    s3_secret_key: SecretStr = Field(
        default=SecretStr(""),
        description="Empty means the one generated in <data_dir>/secrets.env.",
    )
    s3_secure: bool = Field(default=False, description="Use HTTPS for the S3 API.")
    s3_region: str = Field(default="us-east-1")
    bucket_incoming: str = Field(default="incoming", description="Where production images land.")
    bucket_images: str = Field(default="images", description="Ingested images by content hash.")
    bucket_quarantine: str = Field(default="quarantine", description="Rejected files.")
    bucket_datasets: str = Field(default="datasets", description="Versioned dataset snapshots.")
    bucket_reports: str = Field(default="reports", description="Drift and evaluation reports.")
    bucket_mlflow: str = Field(default="mlflow", description="MLflow artifact store.")

    # --- services ------------------------------------------------------------------------
    mlflow_port: int = Field(default=5000)
    mlflow_tracking_uri: str = Field(default="", description="Empty means the local MLflow server.")
    mlflow_experiment: str = Field(default="visionloop")
    model_name: str = Field(default="visionloop-detector", description="Registered model name.")

    prefect_port: int = Field(default=4200)
    prefect_api_url: str = Field(default="", description="Empty means the local Prefect server.")
    prefect_work_pool: str = Field(default="visionloop-local")
    schedules_enabled: bool = Field(
        default=True, description="Register the deployments' schedules active (false: paused)."
    )

    label_studio_port: int = Field(default=8080)
    label_studio_url: str = Field(default="", description="Empty means the local Label Studio.")
    label_studio_token: SecretStr = Field(
        default=SecretStr(""),
        description="Label Studio API token; empty means the one `up` provisioned locally.",
    )
    label_studio_username: str = Field(default="admin@visionloop.local")
    label_studio_password: SecretStr = Field(
        default=SecretStr(""),
        description="Empty means the one generated in <data_dir>/secrets.env.",
    )
    label_studio_project: str = Field(default="visionloop review")
    label_studio_version: str = Field(default="1.23.2")

    api_host: str = Field(default="127.0.0.1")
    api_port: int = Field(default=8000)
    api_token: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer token for mutating API calls; empty means one generated per data dir.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_read_token: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer token for data-bearing GETs (dataset export, reports, images); empty "
        "means the API token is the read token too.",
    )
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Secret Label Studio sends with its webhook calls (it is readable by Label "
        "Studio users, so it opens the webhook only); empty means one generated per data dir.",
    )
    notify_webhook_url: SecretStr = Field(
        default=SecretStr(""),
        description="Where retrain outcomes, promotions and rollbacks are POSTed as JSON (Slack, "
        "Teams, any HTTP endpoint); a secret because such URLs carry a token. Empty: events only.",
    )
    notify_retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description="Retries of a webhook call that failed to connect or got 5xx / 429.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest request body the API reads; larger ones get 413 before a byte is "
        "read past the limit.",
    )
    max_event_streams: int = Field(
        default=16, ge=1, description="Concurrent /api/events/stream connections per API process."
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long /api/predict's batcher waits for more requests to join a batch.",
    )
    batch_max: int = Field(
        default=16, ge=1, description="Most images /api/predict's batcher predicts in one batch."
    )
    batch_queue: int = Field(
        default=64,
        ge=1,
        description="Predictions waiting for the batcher per API process; more get 503 at once.",
    )
    champion_recheck_s: float = Field(
        default=10.0,
        gt=0,
        description="How long the API trusts its cached champion version and age before asking "
        "MLflow again (the retraining conditions).",
    )

    s3_port: int = Field(default=8333, description="Port of the local SeaweedFS S3 API.")

    # --- the model -------------------------------------------------------------------------
    class_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CLASS_NAMES),
        description="Detector classes, comma separated in the environment.",
    )
    model_yaml: str = Field(
        default="yolov8n.yaml", description="Architecture when no weights exist."
    )
    initial_weights: str = Field(
        default="", description="Optional .pt to start the first model from."
    )
    image_size: int = Field(default=160)
    inference_backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        default="auto",
        description="What runs the champion: `auto` the fastest export that passed its parity "
        "check (openvino, then onnx), else PyTorch; `onnx`/`openvino` only that export (PyTorch "
        "when it is not verified); `torch` always PyTorch.",
    )
    inference_precision: Literal["auto", "f32"] = Field(
        default="auto",
        description="What OpenVINO computes in: `auto` what it picks for the CPU (bf16 where the "
        "CPU has bfloat16 units, about twice as fast as f32), `f32` always f32. Exports are "
        "verified at this precision and serve only at the precision they were verified at.",
    )
    inference_mode: Literal["throughput", "latency"] = Field(
        default="throughput",
        description="How an export uses the cores: `throughput` splits them into streams and "
        "runs a batch in parts, one per stream, side by side (a lone image on every core); "
        "`latency` runs every batch on every core, each layer waiting for its slowest core, "
        "so other work on the machine slows every forward pass.",
    )
    train_epochs: int = Field(default=40)
    train_batch: int = Field(default=16)
    device: str = Field(
        default="auto",
        description="Where training, evaluation and export run: `auto` (cuda:0 when torch sees "
        "a GPU, else cpu), `cpu` or `cuda:N`. Resolved when used (`training.trainer."
        "resolve_device`), so reading the settings never imports torch.",
    )
    bootstrap_images: int = Field(default=48)
    seed: int = Field(default=0)

    # --- loop thresholds -------------------------------------------------------------------
    uncertainty_low: float = Field(default=UNCERTAINTY_LOW)
    uncertainty_high: float = Field(default=UNCERTAINTY_HIGH)
    labeling_budget: int = Field(default=LABELING_BUDGET)
    drift_audit_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of confident images sent for review while drift is yellow or red: a "
        "drifted model is often confidently blind (no box at all), so its confidence cannot "
        "choose.",
    )
    control_rate: float = Field(
        default=CONTROL_RATE,
        ge=0.0,
        le=1.0,
        description="Share of each cycle's labelling budget drawn uniformly at random from the "
        "cycle's images: the control arm the label-savings ledger compares selection against.",
    )
    candidate_conf: float = Field(
        default=CANDIDATE_CONF,
        ge=0.0,
        le=1.0,
        description="Lowest box confidence kept for scoring uncertainty (boxes under the display "
        "threshold are scored, never shown).",
    )
    drift_yellow: float = Field(default=0.3)
    drift_red: float = Field(default=0.7)
    drift_stat_test: str = Field(
        default="ks", description="Evidently stat test: ks, psi, wasserstein, jensenshannon, ..."
    )
    drift_window_hours: float = Field(
        default=24.0, description="Current window: the last N hours..."
    )
    drift_window_size: int = Field(default=500, description="...or at most the last N images.")
    drift_min_window: int = Field(default=30, description="Fewer images than this: no verdict.")
    min_new_labels: int = Field(default=100)
    min_labels_to_retrain: int = Field(
        default=30,
        ge=0,
        description="Automatic retrains wait for at least this many new reviewed labels: after "
        "drift, the model can only learn the new conditions from labels taken under them.",
    )
    retrain_cooldown_hours: float = Field(default=6.0)
    max_champion_age_hours: float = Field(
        default=24.0 * 7, description="A champion older than this is retrained on a schedule."
    )
    promotion_margin: float = Field(default=0.0)
    adwin_window: int = Field(
        default=2000,
        ge=0,
        le=100_000,
        description="The champion's newest predictions ADWIN replays to watch its confidence "
        "stream; 0 turns the streaming detector off.",
    )
    adwin_delta: float = Field(
        default=0.002,
        gt=0,
        lt=1,
        description="ADWIN's confidence parameter: smaller finds fewer, surer changes.",
    )
    min_holdout_images: int = Field(
        default=5,
        ge=0,
        description="A challenger is never promoted over a champion on a held-out set of fewer "
        "images (the first champion needs none).",
    )
    holdout_growth: int = Field(
        default=10,
        ge=1,
        description="New test-split images that seal the next frozen held-out version; fewer "
        "wait (pending) while the gate keeps scoring on the newest version.",
    )
    bootstrap_resamples: int = Field(
        default=1000,
        ge=1,
        description="Paired bootstrap resamples of the held-out images for the interval of "
        "the mAP50-95 difference (challenger - champion) that the gate reports.",
    )
    gate_requires_interval: bool = Field(
        default=False,
        description="Promote only if the whole 95% bootstrap interval of the mAP50-95 "
        "difference is above zero; off, the interval is reported but does not decide.",
    )
    class_drop_tolerance: float = Field(default=0.05)
    train_approved_only: bool = Field(
        default=False,
        description="Train on approved reviewed labels only (a second reviewer approved them "
        "through POST /api/labeling/queue/{id}/approve); off, every reviewed label is used.",
    )

    # --- outages: every client waits a bounded time and retries a bounded number of times ---
    service_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Connect/read timeout of each call to S3, MLflow, Label Studio, Prefect and "
        "the database.",
    )
    service_retries: int = Field(
        default=2, ge=0, description="Retries of a failed call to a service before giving up."
    )
    task_retries: int = Field(
        default=2, ge=0, description="Prefect retries of a flow task that talks to a server."
    )
    task_retry_delay_s: float = Field(default=5.0, ge=0)

    # --- hostile input ----------------------------------------------------------------------
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Images with more pixels are refused before decoding.",
    )
    decode_budget_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Decoded pixels held at once by one ingest process: batches wait for room "
        "instead of counting files.",
    )
    ingest_max_attempts: int = Field(
        default=3,
        ge=1,
        description="A file whose batch crashed or timed out this many times is quarantined.",
    )
    ingest_batch_timeout_s: float = Field(
        default=600.0, gt=0, description="A batch taking longer than this counts as timed out."
    )

    # --- scale-out ---------------------------------------------------------------------------
    task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="How the ingest flow fans its batches out: a thread pool in the flow's "
        "process, or a Dask cluster (prefect-dask).",
    )
    dask_address: str = Field(
        default="", description="Scheduler of an existing Dask cluster; empty starts a local one."
    )
    dask_workers: int = Field(default=2, ge=1, description="Workers of the local Dask cluster.")

    @field_validator("class_names", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("class_names")
    @classmethod
    def _classes_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("VISIONLOOP_CLASS_NAMES must name at least one class")
        if len(set(value)) != len(value):
            raise ValueError(f"VISIONLOOP_CLASS_NAMES has duplicates: {value}")
        return value

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        device = value.strip().lower()
        if device in ("auto", "cpu") or re.fullmatch(r"cuda:\d+", device):
            return device
        raise ValueError(
            f"VISIONLOOP_DEVICE must be auto, cpu or cuda:N (N a GPU index, e.g. cuda:0), "
            f"got {value!r}"
        )

    @field_validator("mlflow_port", "prefect_port", "label_studio_port", "api_port", "s3_port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} is outside 1-65535")
        return value

    @model_validator(mode="after")
    def _check_thresholds(self) -> Settings:
        if not 0 <= self.uncertainty_low < self.uncertainty_high <= 1:
            raise ValueError(
                "need 0 <= VISIONLOOP_UNCERTAINTY_LOW < VISIONLOOP_UNCERTAINTY_HIGH <= 1, got "
                f"{self.uncertainty_low} and {self.uncertainty_high}"
            )
        if not 0 <= self.drift_yellow <= self.drift_red <= 1:
            raise ValueError(
                "need 0 <= VISIONLOOP_DRIFT_YELLOW <= VISIONLOOP_DRIFT_RED <= 1, got "
                f"{self.drift_yellow} and {self.drift_red}"
            )
        self.data_dir = self.data_dir.expanduser().resolve()
        self.tools_dir = self.tools_dir.expanduser().resolve()
        return self

    # --- derived values: one place that knows the local defaults ----------------------------
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'visionloop.db'}"

    @property
    def s3_host(self) -> str:
        return self.s3_endpoint or f"127.0.0.1:{self.s3_port}"

    @property
    def s3_url(self) -> str:
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_host}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return self.prefect_api_url or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def label_studio(self) -> str:
        return (self.label_studio_url or f"http://127.0.0.1:{self.label_studio_port}").rstrip("/")

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def all_buckets(self) -> list[str]:
        return [
            self.bucket_incoming,
            self.bucket_images,
            self.bucket_quarantine,
            self.bucket_datasets,
            self.bucket_reports,
            self.bucket_mlflow,
        ]


SECRETS_FILE = "secrets.env"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that recreates ``settings`` in a child process (every value explicit)."""
    env = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        env[f"VISIONLOOP_{name.upper()}"] = str(value)
    return env


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, ``.env`` and the data dir's generated ``secrets.env``.

    Secrets never live in code: for the local stack ``visionloop up`` generates them once per
    data dir; the environment and ``.env`` always win over that file.
    """
    data_dir = Settings(**overrides).data_dir  # type: ignore[arg-type]
    return Settings(_env_file=(data_dir / SECRETS_FILE, ".env"), **overrides)  # type: ignore[call-arg]


@lru_cache
def get_settings() -> Settings:
    return load_settings()
