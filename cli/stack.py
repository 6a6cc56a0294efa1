"""The local stack: start, health-check and stop the servers the loop talks to.

Everything lives under ``settings.data_dir``: each service's state in its own folder, its log
in ``logs/`` and, while `up` owns it, a PID record in ``run/``. `down` only stops processes that
have such a record (and whose command line still matches it, so a recycled PID is never hit).
A service whose URL setting points elsewhere is external: `up` checks it and never starts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
from pydantic import SecretStr

from monitoring.health import PROBES, ServiceHealth
from visionloop.settings import SECRETS_FILE, Settings, settings_env


class StackError(RuntimeError):
    """The stack could not be brought to the asked state; the message says what to change."""


@dataclass
class ServiceSpec:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    port_setting: str = ""
    external_setting: str = ""  # non-empty: the setting that made this service external
    startup_timeout: float = 90.0
    cwd: Path | None = None
    # Runs before the service is spawned, never when it is reused or external.
    install: Callable[[], None] | None = None


@dataclass
class ServiceState:
    name: str
    action: str  # started | reused | external | stopped | not running
    health: ServiceHealth | None = None
    pid: int | None = None


# --- small process helpers ---------------------------------------------------------------


def _bin(name: str) -> str:
    """An executable installed next to this interpreter (the project's virtualenv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed next to {sys.executable}; run `uv sync`")
    return found


# What Prefect's server answers while its database is busy (SQLite locked by the scheduler's
# burst of writes right after a deploy, say): Prefect's own client retries these, and so do we.
PREFECT_BUSY = frozenset({429, 502, 503, 504})


def prefect_call(
    settings: Settings,
    method: str,
    path: str,
    *,
    body: dict | None = None,
    patience: float = 90.0,
) -> httpx.Response:
    """One call to Prefect's REST API that waits out a busy server, for `patience` seconds."""
    url = f"{settings.prefect_api}/{path.lstrip('/')}"
    deadline = time.monotonic() + patience
    pause = 0.5
    while True:
        try:
            response = httpx.request(method, url, json=body, timeout=30)
            if response.status_code not in PREFECT_BUSY:
                return response
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
            wait = _retry_after(response, pause)
        except httpx.TransportError as exc:
            problem, wait = f"{type(exc).__name__}: {exc}", pause
        if time.monotonic() + wait > deadline:
            raise StackError(
                f"Prefect at {settings.prefect_api} stayed unavailable for {patience:.0f} s "
                f"({method} {path}: {problem})"
            )
        time.sleep(wait)
        pause = min(pause * 2, 5.0)


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):  # absent, or an HTTP date: our own backoff then
        return default


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(exclude: set[int] = frozenset(), grpc_offset: int = 0) -> int:
    """A port free now and not in ``exclude``; with ``grpc_offset``, port + offset is free too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port in exclude:
            continue
        if grpc_offset and (
            port + grpc_offset > 65535
            or port + grpc_offset in exclude
            or port_in_use(port + grpc_offset)
        ):
            continue
        return port


def _port_owner(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if (
                conn.laddr
                and conn.laddr.port == port
                and conn.status == psutil.CONN_LISTEN
                and conn.pid
            ):
                proc = psutil.Process(conn.pid)
                return f"{proc.name()} (pid {conn.pid})"
    except (psutil.Error, PermissionError):
        pass
    return "another process"


def _terminate_group(pid: int, timeout: float) -> bool:
    """SIGTERM ``pid``'s process group and descendants, SIGKILL what outlives ``timeout``."""
    try:
        # Everything in the group, plus descendants that made their own session.
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return True


# --- service definitions: one builder per service, in start-up order -----------------------


def _state_dir(stack: Stack, name: str) -> Path:
    """The service's own folder under the data dir, created if missing."""
    path = stack.root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _seaweedfs_internal_ports(settings: Settings) -> dict[str, int]:
    """Ports for SeaweedFS's components besides S3, away from every configured port.

    Volume's default, 8080, is Label Studio's. Each component also uses port + 10000 for gRPC,
    and some components assume that offset whatever the flags say.
    """
    s = settings
    taken = {s.s3_port, s.prefect_port, s.mlflow_port, s.label_studio_port, s.api_port}
    internal: dict[str, int] = {}
    for component in ("master", "volume", "filer", "admin"):
        port = free_port(taken | {p + 10000 for p in taken}, grpc_offset=10000)
        internal[component] = port
        taken |= {port, port + 10000}
    return internal


def s3_spec(stack: Stack) -> ServiceSpec:
    """SeaweedFS's mini mode: master, volume, filer, admin and the S3 server the user sees."""
    s = stack.settings
    weed_dir = _state_dir(stack, "seaweedfs")
    internal = _seaweedfs_internal_ports(s)
    return ServiceSpec(
        name="s3",
        command=[
            _bin("weed"),
            "mini",
            f"-dir={weed_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{component}.port={port}" for component, port in internal.items()),
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-bucket={','.join(s.all_buckets)}",
        ],
        env=stack.s3_env(),
        port=s.s3_port,
        port_setting="VISIONLOOP_S3_PORT",
        external_setting="VISIONLOOP_S3_ENDPOINT" if s.s3_endpoint else "",
        startup_timeout=60,
        cwd=weed_dir,
    )


def prefect_spec(stack: Stack) -> ServiceSpec:
    s = stack.settings
    prefect_home = _state_dir(stack, "prefect")
    return ServiceSpec(
        name="prefect",
        command=[
            _bin("prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(s.prefect_port),
        ],
        env={
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": s.prefect_api,
        },
        port=s.prefect_port,
        port_setting="VISIONLOOP_PREFECT_PORT",
        external_setting="VISIONLOOP_PREFECT_API_URL" if s.prefect_api_url else "",
        startup_timeout=120,
    )


def mlflow_spec(stack: Stack) -> ServiceSpec:
    s = stack.settings
    mlflow_dir = _state_dir(stack, "mlflow")
    return ServiceSpec(
        name="mlflow",
        command=[
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{s.bucket_mlflow}",
            "--host",
            "127.0.0.1",
            "--port",
            str(s.mlflow_port),
            "--workers",
            "1",
        ],
        env={
            **stack.s3_env(),
            # MLflow 3 otherwise runs seven job-queue consumers (GenAI jobs the loop never
            # uses) that take a whole core between them.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
        port=s.mlflow_port,
        port_setting="VISIONLOOP_MLFLOW_PORT",
        external_setting="VISIONLOOP_MLFLOW_TRACKING_URI" if s.mlflow_tracking_uri else "",
        startup_timeout=120,
        cwd=mlflow_dir,
    )


# Label Studio's own default banned subnets (1.23): it offers no allow list, only this list
# switched off as a whole plus a list of extra bans, so the stack rebuilds it minus the few
# addresses Label Studio must reach.
LABEL_STUDIO_DEFAULT_BANNED_SUBNETS = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "233.252.0.0/24",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:0000::/32",
    "2001:20::/28",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def banned_subnets_except(allowed: set[IPAddress]) -> list[str]:
    """Label Studio's default banned subnets with exactly the ``allowed`` addresses cut out."""
    banned: list[str] = []
    for subnet in map(ipaddress.ip_network, LABEL_STUDIO_DEFAULT_BANNED_SUBNETS):
        pieces = [subnet]
        for address in allowed:
            pieces = [
                rest
                for piece in pieces
                for rest in (
                    piece.address_exclude(ipaddress.ip_network(address))
                    if piece.version == address.version and address in piece
                    else [piece]
                )
            ]
        banned.extend(str(piece) for piece in sorted(pieces))
    return banned


def _host_addresses(host: str) -> set[IPAddress]:
    """Every address ``host`` (an IP or a name, with or without a port) resolves to."""
    name = urlsplit(f"//{host}").hostname or host
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise StackError(f"cannot resolve {name!r}: {exc}") from exc
    return {ipaddress.ip_address(info[4][0]) for info in infos}


def label_studio_ssrf_env(settings: Settings) -> dict[str, str]:
    """Label Studio's SSRF guard on, open only to the object store and the API's webhook.

    Both live on private or loopback addresses in a self-hosted platform, which the guard bans
    wholesale. Label Studio bans by address only, so every port of an allowed address stays
    reachable: these are the addresses of the S3 endpoint and the API, nothing else.
    """
    allowed = _host_addresses(settings.s3_host) | _host_addresses(settings.api_host)
    return {
        "SSRF_PROTECTION_ENABLED": "true",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(banned_subnets_except(allowed)),
    }


def label_studio_spec(stack: Stack) -> ServiceSpec:
    s = stack.settings
    ls_dir = _state_dir(stack, "label-studio")
    return ServiceSpec(
        name="label-studio",
        command=[
            str(stack.label_studio_bin()),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(s.label_studio_port),
        ],
        env={
            # Credentials by environment, not argv, so `ps` does not show them.
            "LABEL_STUDIO_USERNAME": s.label_studio_username,
            "LABEL_STUDIO_PASSWORD": s.label_studio_password.get_secret_value(),
            "LABEL_STUDIO_BASE_DATA_DIR": str(ls_dir),
            "LABEL_STUDIO_HOST": s.label_studio,
            # Review images come from S3 through the connected storage; serving host files
            # would let any Label Studio user read them. Said explicitly: left unset, Label
            # Studio turns it on by itself when it finds a likely document root.
            "LOCAL_FILES_SERVING_ENABLED": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            **label_studio_ssrf_env(s),
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        },
        port=s.label_studio_port,
        port_setting="VISIONLOOP_LABEL_STUDIO_PORT",
        external_setting="VISIONLOOP_LABEL_STUDIO_URL" if s.label_studio_url else "",
        startup_timeout=240,
        cwd=ls_dir,
        install=stack.ensure_label_studio_installed,
    )


def api_spec(stack: Stack) -> ServiceSpec:
    s = stack.settings
    return ServiceSpec(
        name="api",
        command=[
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            s.api_host,
            "--port",
            str(s.api_port),
        ],
        env=stack.platform_env(),
        port=s.api_port,
        port_setting="VISIONLOOP_API_PORT",
        startup_timeout=90,
        cwd=s.project_dir,
    )


# A run created "now" (the API, check-and-retrain starting retrain, the demo) waits for the
# worker's next poll: Prefect's default of 10 s averaged 5 s of nothing before each run, more
# than label-sync's own work. A poll a second costs one small query against a local server.
LOCAL_WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1"}


def worker_spec(stack: Stack) -> ServiceSpec:
    s = stack.settings
    return ServiceSpec(
        name="worker",
        command=[
            _bin("prefect"),
            "worker",
            "start",
            "--pool",
            s.prefect_work_pool,
            "--type",
            "process",
            "--name",
            f"visionloop-{os.uname().nodename}",
        ],
        env={**stack.platform_env(), **LOCAL_WORKER_ENV},
        startup_timeout=90,
        cwd=s.project_dir,
    )


SPEC_BUILDERS: dict[str, Callable[[Stack], ServiceSpec]] = {
    "s3": s3_spec,
    "prefect": prefect_spec,
    "mlflow": mlflow_spec,
    "label-studio": label_studio_spec,
    "api": api_spec,
    "worker": worker_spec,
}
SERVICE_ORDER = list(SPEC_BUILDERS)


class Stack:
    def __init__(self, settings: Settings, echo: Callable[[str], None] = lambda _m: None) -> None:
        self.settings = settings
        self.echo = echo
        self.root = settings.data_dir
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"

    # --- PID records -----------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _record(self, name: str) -> dict | None:
        try:
            return json.loads(self._pid_file(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def running_pid(self, name: str) -> int | None:
        """The PID `up` recorded for ``name`` if that very process still runs."""
        record = self._record(name)
        if not record:
            return None
        try:
            proc = psutil.Process(record["pid"])
            if proc.create_time() != record["create_time"] or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return record["pid"]

    def _spawn(self, spec: ServiceSpec) -> int:
        self.ensure_private_dirs()
        env = {**os.environ, **spec.env}
        with open(self.log_dir / f"{spec.name}.log", "ab") as log:
            proc = subprocess.Popen(
                spec.command,
                env=env,
                cwd=spec.cwd or self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: `down` stops it and its children
            )
        self._pid_file(spec.name).write_text(
            json.dumps(
                {
                    "pid": proc.pid,
                    "create_time": psutil.Process(proc.pid).create_time(),
                    "command": spec.command,
                    "port": spec.port,
                    "started_at": time.time(),
                }
            )
        )
        return proc.pid

    def stop(self, name: str, timeout: float = 20.0) -> bool:
        pid = self.running_pid(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        return _terminate_group(pid, timeout)

    # --- secrets ---------------------------------------------------------------------------
    def ensure_private_dirs(self) -> None:
        """The data dir, run/ and logs/ exist and only their owner can enter them.

        Created 0700 before anything is written into them (secrets, logs with tokens in
        tracebacks); existing ones are tightened.
        """
        for path in (self.root, self.run_dir, self.log_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    def ensure_secrets(self) -> Settings:
        """Generate the local stack's secrets once per data dir, then reload the settings."""
        self.ensure_private_dirs()
        path = self.root / SECRETS_FILE
        wanted = {
            "VISIONLOOP_S3_SECRET_KEY": self.settings.s3_secret_key,
            "VISIONLOOP_LABEL_STUDIO_PASSWORD": self.settings.label_studio_password,
            "VISIONLOOP_API_TOKEN": self.settings.api_token,
            "VISIONLOOP_WEBHOOK_SECRET": self.settings.webhook_secret,
        }
        missing = {
            k: secrets.token_urlsafe(24) for k, v in wanted.items() if not v.get_secret_value()
        }
        if missing:
            self._append_secrets(missing)
        if path.exists():
            os.chmod(path, 0o600)
        return self.reload()

    def _append_secrets(self, values: dict[str, str]) -> None:
        # 0600 from creation on: a chmod after writing would leave a window (or, when the write
        # fails, a file) readable by everyone.
        fd = os.open(self.root / SECRETS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "a") as fh:
            for key, value in values.items():
                fh.write(f"{key}={value}\n")

    def reload(self) -> Settings:
        """Fill secrets that are still empty from ``secrets.env``; every other value stays."""
        from dotenv import dotenv_values

        updates = {}
        for key, value in dotenv_values(self.root / SECRETS_FILE).items():
            name = key.removeprefix("VISIONLOOP_").lower()
            current = getattr(self.settings, name, None)
            if isinstance(current, SecretStr) and not current.get_secret_value() and value:
                updates[name] = SecretStr(value)
        self.settings = self.settings.model_copy(update=updates)
        return self.settings

    # --- what the services and the platform's processes are given ----------------------------
    def s3_env(self) -> dict[str, str]:
        s = self.settings
        return {
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key.get_secret_value(),
            "AWS_DEFAULT_REGION": s.s3_region,
            "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        }

    def platform_env(self) -> dict[str, str]:
        """What a child process of the platform (API, worker, flow runs) needs to find it."""
        s = self.settings
        return {
            **settings_env(s),
            "VISIONLOOP_DATA_DIR": str(s.data_dir),
            "VISIONLOOP_PROJECT_DIR": str(s.project_dir),
            "PREFECT_API_URL": s.prefect_api,
            "PREFECT_HOME": str(self.root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": s.mlflow_uri,
            "YOLO_OFFLINE": "1",
            "YOLO_VERBOSE": "False",
            "YOLO_CONFIG_DIR": str(self.root / "ultralytics"),
            **self.s3_env(),
        }

    def specs(self) -> list[ServiceSpec]:
        """Every service of the stack, in start-up order (``SPEC_BUILDERS``)."""
        return [build(self) for build in SPEC_BUILDERS.values()]

    # --- Label Studio lives in its own virtualenv --------------------------------------------
    def label_studio_venv(self) -> Path:
        return self.settings.tools_dir / f"label-studio-{self.settings.label_studio_version}"

    def label_studio_bin(self) -> Path:
        return self.label_studio_venv() / "bin" / "label-studio"

    def ensure_label_studio_installed(self) -> None:
        if self.label_studio_bin().exists():
            return
        venv = self.label_studio_venv()
        self.echo(
            f"installing Label Studio {self.settings.label_studio_version} into {venv} (once)"
        )
        venv.parent.mkdir(parents=True, exist_ok=True)
        uv = _bin("uv")
        log = self.log_dir / "label-studio-install.log"
        self.ensure_private_dirs()
        with open(log, "wb") as fh:
            for cmd, env in (
                ([uv, "venv", "-q", "--python", sys.executable, str(venv)], {}),
                (
                    [uv, "pip", "install", f"label-studio=={self.settings.label_studio_version}"],
                    {"VIRTUAL_ENV": str(venv)},
                ),
            ):
                done = subprocess.run(
                    cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT
                )
                if done.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise StackError(f"installing Label Studio failed; see {log}")

    # --- the public verbs --------------------------------------------------------------------
    def up(self, only: list[str] | None = None) -> list[ServiceState]:
        self.ensure_secrets()
        specs = {spec.name: spec for spec in self.specs() if not only or spec.name in only}
        states: dict[str, ServiceState] = {}

        def start(name: str) -> None:
            if name in specs:
                states[name] = self._start(specs[name])

        def wait(name: str) -> None:
            if name in specs:
                states[name].health = self._wait_healthy(specs[name], states[name])

        # The servers that depend on nothing start together (Label Studio alone takes ~30 s);
        # the API and the worker only once what they talk to answers.
        for name in ("s3", "prefect", "mlflow", "label-studio"):
            start(name)
        wait("s3")
        if "s3" in specs:
            from visionloop.storage import ObjectStore

            ObjectStore(self.settings).ensure_buckets()
        wait("prefect")
        wait("mlflow")
        wait("label-studio")
        if "label-studio" in specs:
            self._provision_label_studio()
        # Started after provisioning so that they read a complete secrets.env.
        if "api" in specs:
            self._prepare_platform()
            start("api")
        if "worker" in specs:
            self._ensure_work_pool()
            self._deploy_flows()
            start("worker")
        wait("api")
        wait("worker")
        return [states[name] for name in SERVICE_ORDER if name in states]

    def _start(self, spec: ServiceSpec) -> ServiceState:
        if spec.external_setting:
            return ServiceState(spec.name, "external")
        pid = self.running_pid(spec.name)
        if pid is not None:
            return ServiceState(spec.name, "reused", pid=pid)
        if spec.install is not None:
            spec.install()
        if spec.port is not None and port_in_use(spec.port):
            raise StackError(
                f"port {spec.port} for {spec.name} is already in use by {_port_owner(spec.port)}; "
                f"stop it or set {spec.port_setting} to a free port"
            )
        return ServiceState(spec.name, "started", pid=self._spawn(spec))

    def _wait_healthy(self, spec: ServiceSpec, state: ServiceState) -> ServiceHealth:
        probe = PROBES[spec.name]
        deadline = time.monotonic() + (5 if state.action == "external" else spec.startup_timeout)
        while True:
            health = probe(self.settings, 3.0)
            if health.ok:
                return health
            if state.action != "external" and self.running_pid(spec.name) is None:
                raise StackError(
                    f"{spec.name} exited during start-up: {health.detail}; see its log "
                    f"{self._log_path(spec.name)}\n{self._log_tail(spec.name)}"
                )
            if time.monotonic() > deadline:
                where = (
                    f"check {spec.external_setting}"
                    if state.action == "external"
                    else f"see {self._log_path(spec.name)}"
                )
                raise StackError(
                    f"{spec.name} at {health.url} is not healthy: {health.detail}; {where}"
                )
            time.sleep(1.0)

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self._log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _prepare_platform(self) -> None:
        from visionloop.db import migrate

        migrate(self.settings.db_url)

    def _provision_label_studio(self) -> None:
        from labeling.provision import provision

        s = self.settings
        access = provision(
            url=s.label_studio,
            username=s.label_studio_username,
            password=s.label_studio_password.get_secret_value(),
            title=s.label_studio_project,
            class_names=s.class_names,
            token=s.label_studio_token.get_secret_value(),
        )
        if access.token != s.label_studio_token.get_secret_value():
            self._append_secrets({"VISIONLOOP_LABEL_STUDIO_TOKEN": access.token})
            self.reload()
        self._register_webhook()

    def _register_webhook(self) -> None:
        """Point the review project's webhook at the API with the current webhook secret now,
        so a rotated secret (or an upgrade from the API token) does not wait for queued tasks.
        """
        from labeling.wiring import ensure_webhook, review_project

        ensure_webhook(self.settings, review_project(self.settings))

    def _ensure_work_pool(self) -> None:
        pool = self.settings.prefect_work_pool
        response = prefect_call(
            self.settings, "POST", "work_pools/", body={"name": pool, "type": "process"}
        )
        if response.status_code not in (201, 409):
            raise StackError(f"creating Prefect work pool {pool!r} failed: {response.text[:300]}")

    # --- deployments -------------------------------------------------------------------------
    def _deploy_flows(self) -> None:
        """Register prefect.yaml's deployments (an upsert), paused unless schedules are enabled."""
        stamp = self.run_dir / "deployed.sha256"
        wanted = self._deploy_fingerprint()
        if stamp.exists() and stamp.read_text() == wanted and self._deployments():
            return  # this very recipe is registered on this server already
        self._run_prefect_deploy()
        self._match_pauses_to_schedules()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)

    def _deploy_fingerprint(self) -> str:
        """The recipe and what it was deployed against: a change of either redeploys."""
        recipe = self.settings.project_dir / "prefect.yaml"
        return hashlib.sha256(
            recipe.read_bytes()
            + f"{self.settings.prefect_api}|{self.settings.schedules_enabled}".encode()
        ).hexdigest()

    def _run_prefect_deploy(self) -> None:
        log = self._log_path("deploy")
        with open(log, "wb") as fh:
            done = subprocess.run(
                [_bin("prefect"), "--no-prompt", "deploy", "--all"],
                env={**os.environ, **self.platform_env()},
                cwd=self.settings.project_dir,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=600,
            )
        if done.returncode != 0:
            raise StackError(
                f"`prefect deploy --all` failed; see {log}\n{self._log_tail('deploy')}"
            )

    def _match_pauses_to_schedules(self) -> None:
        for deployment in self._deployments():
            if deployment["paused"] == self.settings.schedules_enabled:
                prefect_call(
                    self.settings,
                    "PATCH",
                    f"deployments/{deployment['id']}",
                    body={"paused": not self.settings.schedules_enabled},
                ).raise_for_status()

    def _deployments(self) -> list[dict]:
        response = prefect_call(self.settings, "POST", "deployments/filter", body={})
        response.raise_for_status()
        return response.json()

    def down(self) -> list[ServiceState]:
        states = []
        for spec_name in reversed(SERVICE_ORDER):
            stopped = self.stop(spec_name)
            states.append(ServiceState(spec_name, "stopped" if stopped else "not running"))
        return states

    def status(self) -> list[ServiceState]:
        from monitoring.health import check_all

        states = []
        for health in check_all(self.settings):
            pid = self.running_pid(health.name) if health.name in SERVICE_ORDER else None
            states.append(ServiceState(health.name, "running" if pid else "", health, pid))
        return states

    def urls(self) -> dict[str, str]:
        s = self.settings
        return {
            "Prefect UI": s.prefect_api.removesuffix("/api"),
            "MLflow": s.mlflow_uri,
            "Label Studio": s.label_studio,
            "Dashboard": f"{s.api_url}/dashboard",
            "API docs": f"{s.api_url}/docs",
            "S3 API": s.s3_url,
        }
