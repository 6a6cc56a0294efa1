"""The production stack (docker-compose.yml + deployments/) checked without a Docker engine.

No container is built or started here. The compose file is parsed with PyYAML and held against
`visionloop.settings.Settings`, the single source of the platform's names and defaults: env
variable names, default ports, buckets, the Prefect work pool. A renamed setting, a typo in an
env name, a bucket added to Settings but not created, or a secret written in clear fails here
instead of in a deployment.

`docker compose config` is approximated by `interpolate()`, which implements compose's
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`
and `$$` rules, fed with deployments/.env.example. Like compose, it substitutes in the parsed
file's values, never in comments.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from visionloop.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deployments" / ".env.example"
POSTGRES_INIT = ROOT / "deployments" / "postgres-init.sql"
PREFIX = Settings.model_config["env_prefix"]  # "VISIONLOOP_"

SERVICES = {
    "minio",
    "minio-init",
    "postgres",
    "prefect-server",
    "prefect-worker",
    "mlflow",
    "label-studio",
    "api",
}
# Services that run visionloop code and therefore need the full wiring.
PROJECT_SERVICES = ["api", "prefect-worker"]
# Without these the Settings defaults would silently point at 127.0.0.1 inside a container.
REQUIRED_PROJECT_ENV = {
    "VISIONLOOP_DATABASE_URL",
    "VISIONLOOP_S3_ENDPOINT",
    "VISIONLOOP_S3_ACCESS_KEY",
    "VISIONLOOP_S3_SECRET_KEY",
    "VISIONLOOP_MLFLOW_TRACKING_URI",
    "VISIONLOOP_PREFECT_API_URL",
    "VISIONLOOP_LABEL_STUDIO_URL",
    "VISIONLOOP_LABEL_STUDIO_TOKEN",
    "VISIONLOOP_API_TOKEN",
    "VISIONLOOP_API_READ_TOKEN",
    "VISIONLOOP_WEBHOOK_SECRET",
}
# Published service -> (Settings field with its default port, port the server listens on when
# its command line does not say `--port`).
SETTINGS_PORTS = {
    "api": ("api_port", None),
    "prefect-server": ("prefect_port", 4200),
    "mlflow": ("mlflow_port", 5000),
    "label-studio": ("label_studio_port", 8080),
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
# Only these reach the host, and only on loopback unless BIND_ADDRESS says otherwise: Prefect
# and MLflow have no authentication, PostgreSQL and MinIO hold every secret's worth of data.
PUBLISHED = {"api", "label-studio"}
UNPUBLISHED = {"prefect-server", "mlflow", "postgres", "minio"}


# --- compose variable interpolation --------------------------------------------------------------


class InterpolationError(ValueError):
    pass


_DOLLAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_EXPRESSION = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute variables as `docker compose` does, but strictly: an unset variable without
    a default is an error (compose would warn and use an empty string), and so is any `${`
    that is not a well-formed expression."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            raise InterpolationError(
                f"bare ${match['bare']} is interpolated by compose; write $${match['bare']} "
                "for the container's shell or ${...} for compose"
            )
        expression = _EXPRESSION.match(match["braced"])
        if not expression:
            raise InterpolationError(f"malformed substitution ${{{match['braced']}}}")
        name, op, arg = expression["name"], expression["op"], expression["arg"]
        value = env.get(name)
        is_set, non_empty = value is not None, bool(value)
        if op is None:
            if not is_set:
                raise InterpolationError(f"{name} is not set and has no default")
            return value
        present = non_empty if op.startswith(":") else is_set
        if op.endswith("-"):
            return value if present else interpolate(arg, env)
        if op.endswith("?"):
            if not present:
                raise InterpolationError(f"{name}: {arg}")
            return value
        return interpolate(arg, env) if present else ""  # ":+" / "+"

    # `$$` is set aside first so that an escaped `$${...}` can never look like a leftover `${`.
    result = _DOLLAR.sub(substitute, text.replace("$$", "\0"))
    if "${" in result:
        raise InterpolationError("unresolved ${ left after interpolation")
    return result.replace("\0", "$")


def interpolate_values(node: Any, env: dict[str, str]) -> Any:
    """`interpolate` applied to every string value of a parsed compose file (keys untouched)."""
    if isinstance(node, dict):
        return {key: interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    """Every string value of a parsed compose file."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def substitutions(document: Any) -> list[tuple[str, str | None, str]]:
    """Every `${NAME<op><arg>}` in the file's values as (name, op, arg), escaped `$${` excluded."""
    found = []
    for text in strings(document):
        for match in _DOLLAR.finditer(text):
            if match["braced"] is not None and (expression := _EXPRESSION.match(match["braced"])):
                found.append((expression["name"], expression["op"], expression["arg"] or ""))
    return found


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


# --- reading services ----------------------------------------------------------------------------


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(args: list[str], *names: str) -> str | None:
    """Value of `--name value` / `--name=value` in an argument list."""
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def published_bindings(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of every published port; "" is all addresses."""
    bindings = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host = str(entry.get("host_ip", ""))
            bindings.append((host, int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        host = parts[0] if len(parts) == 3 else ""
        bindings.append((host, int(parts[-2]) if len(parts) > 1 else 0, int(parts[-1])))
    return bindings


def networks(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    joined = service.get("networks") or ["default"]
    return {n: {} for n in joined} if isinstance(joined, list) else dict(joined)


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs, from the short or the long `ports` syntax."""
    pairs = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            pairs.add((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 1:
            continue  # container port only: published on a random host port
        pairs.add((int(parts[-2]), int(parts[-1])))
    return pairs


def listen_port(services: dict[str, Any], name: str) -> int:
    """The port a server listens on inside its container, as its command line says."""
    if name == "minio":
        return int(option(command(services["minio"]), "--address").rsplit(":", 1)[1])
    if name == "postgres":
        return 5432
    explicit = option(command(services[name]), "--port", "-p")
    return int(explicit) if explicit else SETTINGS_PORTS[name][1]


def created_databases(services: dict[str, Any]) -> set[str]:
    names = {environment(services["postgres"])["POSTGRES_DB"]}
    names |= set(re.findall(r"CREATE DATABASE\s+\"?(\w+)\"?", POSTGRES_INIT.read_text(), re.I))
    return names


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defaults() -> Settings:
    """Settings() with its defaults only: the developer's own VISIONLOOP_* variables or .env
    must not change what the compose file is compared with."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(PREFIX):
                mp.delenv(key)
        return Settings(_env_file=None)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The whole compose file as written, `${...}` still in place (YAML anchors merged)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def raw(document: dict[str, Any]) -> dict[str, Any]:
    return document["services"]


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved(document: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    """The services as `docker compose --env-file deployments/.env.example config` sees them."""
    return interpolate_values(document, example_env)["services"]


def settings_from(env: dict[str, str]) -> Settings:
    """Settings exactly as a container with this environment would build them."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(PREFIX):
                mp.delenv(key)
        for key, value in env.items():
            if key.startswith(PREFIX):
                mp.setenv(key, value)
        return Settings(_env_file=None)


# --- services and ports --------------------------------------------------------------------------


def test_every_service_exists(raw: dict[str, Any]) -> None:
    assert set(raw) >= SERVICES, f"missing services: {sorted(SERVICES - set(raw))}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_port_is_the_settings_default(
    name: str, raw: dict[str, Any], defaults: Settings
) -> None:
    field = SETTINGS_PORTS[name][0]
    expected = (getattr(defaults, field), listen_port(raw, name))
    assert expected in published_ports(raw[name]), (
        f"{name} must publish {field}={expected[0]} onto the port its command listens on "
        f"({expected[1]}); got {sorted(published_ports(raw[name]))}"
    )


def test_infrastructure_ports(raw: dict[str, Any]) -> None:
    minio_args = command(raw["minio"])
    assert option(minio_args, "--address") == ":9000"
    assert option(minio_args, "--console-address") == ":9001"


def test_only_the_api_and_label_studio_are_published(raw: dict[str, Any]) -> None:
    published = {name for name, service in raw.items() if service.get("ports")}
    assert published == PUBLISHED, f"published: {sorted(published)}"
    assert not published & UNPUBLISHED


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_ports_bind_loopback_by_default(name: str, resolved: dict[str, Any]) -> None:
    bindings = published_bindings(resolved[name])
    assert bindings and all(host == "127.0.0.1" for host, _, _ in bindings), bindings


def test_bind_address_moves_every_published_port(
    document: dict[str, Any], example_env: dict[str, str]
) -> None:
    services = interpolate_values(document, {**example_env, "BIND_ADDRESS": "10.1.2.3"})
    for name in PUBLISHED:
        hosts = {host for host, _, _ in published_bindings(services["services"][name])}
        assert hosts == {"10.1.2.3"}, f"{name}: {hosts}"


def test_backend_network_is_internal_and_joined_by_every_service(
    raw: dict[str, Any], document: dict[str, Any]
) -> None:
    declared = document.get("networks") or {}
    assert declared.get("backend", {}).get("internal") is True
    for name, service in raw.items():
        assert "backend" in networks(service), f"{name} is not on the backend network"
    on_edge = {name for name, service in raw.items() if set(networks(service)) - {"backend"}}
    assert on_edge == PUBLISHED, f"beyond the internal network: {sorted(on_edge)}"


def test_docker_pool_flow_runs_and_worker_join_networks_compose_creates(
    document: dict[str, Any],
) -> None:
    # Compose names a network `<project>_<name>` and creates `default` only for a service that
    # joins it; with every service on `backend`, a flow run sent to `<project>_default` would
    # fail to start.
    project = document["name"]
    pool = yaml.safe_load((ROOT / "deployments" / "work-pools" / "docker.yaml").read_text())
    variables = pool["job_variables"]
    assert variables["networks"] == [f"{project}_backend"]
    volumes = {spec.split(":")[0] for spec in variables["volumes"]}
    assert volumes == {f"{project}_visionloop-data"} and "visionloop-data" in document["volumes"]
    addition = yaml.safe_load((ROOT / "deployments" / "compose.docker-pool.yml").read_text())
    worker = addition["services"]["docker-worker"]
    assert "backend" in networks(worker), "the docker worker cannot reach prefect-server"
    assert not worker.get("ports")


def test_gpu_addition_gives_the_flow_runs_worker_one_nvidia_gpu(
    raw: dict[str, Any], resolved: dict[str, Any]
) -> None:
    """`-f deployments/compose.gpu.yml`: the process worker (flow runs are its subprocesses)
    reserves one NVIDIA GPU and names it in VISIONLOOP_DEVICE, which the settings accept."""
    addition = yaml.safe_load((ROOT / "deployments" / "compose.gpu.yml").read_text())
    assert set(addition["services"]) == {"prefect-worker"} <= set(raw)
    worker = addition["services"]["prefect-worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # Compose merges the addition's environment into the service's own.
    merged = {**environment(resolved["prefect-worker"]), **worker["environment"]}
    assert settings_from(merged).device == "cuda:0"
    # Without the addition no service reserves a device (compose would refuse on a CPU host).
    assert not any("deploy" in service for service in raw.values())


def test_label_studio_has_no_local_files_and_its_ssrf_guard_on(
    raw: dict[str, Any], resolved: dict[str, Any]
) -> None:
    import ipaddress

    from cli.stack import banned_subnets_except

    env = environment(resolved["label-studio"])
    assert env["LOCAL_FILES_SERVING_ENABLED"].lower() == "false"
    assert env["SSRF_PROTECTION_ENABLED"].lower() == "true"
    # The defaults are switched off only to be rebuilt below, minus what Label Studio must
    # reach: the API (webhook, on each of its networks) and MinIO (review images).
    assert env["USE_DEFAULT_BANNED_SUBNETS"].lower() == "false"
    reachable = {
        ipaddress.ip_address(net["ipv4_address"])
        for name in ("api", "minio")
        for net in networks(raw[name]).values()
    }
    assert len(reachable) == 3
    expected = banned_subnets_except(reachable)
    assert env["USER_ADDITIONAL_BANNED_SUBNETS"].split(",") == expected


# --- env names against Settings ------------------------------------------------------------------


def _env_name_problems(names: set[str]) -> list[str]:
    fields = Settings.model_fields
    return sorted(
        name
        for name in names
        if name.startswith(PREFIX)
        and (name != name.upper() or name[len(PREFIX) :].lower() not in fields)
    )


def test_visionloop_env_names_are_settings_fields(
    raw: dict[str, Any], document: dict[str, Any]
) -> None:
    names = {key for service in raw.values() for key in environment(service)}
    # Compose-level variables such as ${VISIONLOOP_API_TOKEN} also reach the containers
    # through env_file, so they must be real settings as well.
    names |= {name for name, _op, _arg in substitutions(document)}
    assert not _env_name_problems(names), "not a Settings field: " + ", ".join(
        _env_name_problems(names)
    )


def test_env_example_names_are_settings_fields() -> None:
    # Commented-out tunables are documentation; a typo there is copied into real .env files.
    names = set(re.findall(r"^[#\s]*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert names, "deployments/.env.example documents no variables"
    assert not _env_name_problems(names), "not a Settings field: " + ", ".join(
        _env_name_problems(names)
    )


# --- wiring of the services that run visionloop code ---------------------------------------------


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_project_service_sets_required_settings(name: str, raw: dict[str, Any]) -> None:
    missing = REQUIRED_PROJECT_ENV - set(environment(raw[name]))
    assert not missing, f"{name} lacks {sorted(missing)}"


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_project_service_wiring(name: str, resolved: dict[str, Any], defaults: Settings) -> None:
    env = environment(resolved[name])
    settings = settings_from(env)  # also proves every value parses as its Settings type
    postgres, minio = environment(resolved["postgres"]), environment(resolved["minio"])
    ls_env = environment(resolved["label-studio"])

    db = urlsplit(settings.db_url)
    assert db.scheme in {"postgresql", "postgresql+psycopg"}, settings.db_url
    assert (db.hostname, db.port) == ("postgres", listen_port(resolved, "postgres"))
    assert (db.username, db.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert db.path.lstrip("/") in created_databases(resolved)

    assert settings.s3_endpoint == f"minio:{listen_port(resolved, 'minio')}"
    assert settings.s3_url == "http://minio:9000"
    assert settings.s3_access_key == minio["MINIO_ROOT_USER"]
    assert settings.s3_secret_key.get_secret_value() == minio["MINIO_ROOT_PASSWORD"]

    assert settings.mlflow_uri == f"http://mlflow:{listen_port(resolved, 'mlflow')}"
    assert (
        settings.prefect_api
        == f"http://prefect-server:{listen_port(resolved, 'prefect-server')}/api"
    )
    assert settings.label_studio == f"http://label-studio:{listen_port(resolved, 'label-studio')}"
    assert settings.label_studio_token.get_secret_value() == ls_env["LABEL_STUDIO_USER_TOKEN"]
    assert settings.label_studio_username == ls_env["LABEL_STUDIO_USERNAME"]
    assert settings.label_studio_password.get_secret_value() == ls_env["LABEL_STUDIO_PASSWORD"]
    assert settings.api_token.get_secret_value()
    assert settings.prefect_work_pool == defaults.prefect_work_pool

    # Third-party clients read their own variables; they must say the same thing.
    assert env["PREFECT_API_URL"] == settings.prefect_api
    assert env["MLFLOW_TRACKING_URI"] == settings.mlflow_uri
    assert env["MLFLOW_S3_ENDPOINT_URL"] == settings.s3_url
    assert env["AWS_ACCESS_KEY_ID"] == settings.s3_access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == settings.s3_secret_key.get_secret_value()


def test_worker_polls_the_settings_work_pool(raw: dict[str, Any], defaults: Settings) -> None:
    args = command(raw["prefect-worker"])
    assert args[:3] == ["prefect", "worker", "start"], args
    assert option(args, "--pool", "-p") == defaults.prefect_work_pool


def test_api_command(raw: dict[str, Any], defaults: Settings) -> None:
    args = command(raw["api"])
    assert args[:2] == ["uvicorn", "api.main:app"], args
    assert option(args, "--host") == "0.0.0.0"
    assert int(option(args, "--port")) == defaults.api_port
    assert (ROOT / "api").is_dir()


def test_migrate_job_calls_the_project_migration(raw: dict[str, Any]) -> None:
    import visionloop.db

    script = " ".join(command(raw["migrate"]))
    assert "from visionloop.db import migrate" in script and callable(visionloop.db.migrate)
    api_deps = raw["api"]["depends_on"]
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"


# --- object store, MLflow, Prefect, Label Studio -------------------------------------------------


def test_minio_init_creates_the_settings_buckets(raw: dict[str, Any], defaults: Settings) -> None:
    script = "\n".join(command(raw["minio-init"]))
    alias = re.search(r"mc alias set (\S+) http://minio:9000\b", script)
    assert alias, "minio-init must point an mc alias at http://minio:9000"
    buckets = re.findall(rf"mc mb (?:--\S+\s+)*{re.escape(alias[1])}/([\w.-]+)", script)
    assert sorted(buckets) == sorted(defaults.all_buckets)


def test_mlflow_server(resolved: dict[str, Any], defaults: Settings) -> None:
    mlflow = resolved["mlflow"]
    args = command(mlflow)
    assert args[:2] == ["mlflow", "server"], args
    assert option(args, "--artifacts-destination") == f"s3://{defaults.bucket_mlflow}"
    assert option(args, "--host") == "0.0.0.0"
    backend = urlsplit(option(args, "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    assert backend.path.lstrip("/") in created_databases(resolved)
    # MLflow 3 answers 403 to a Host header it does not allow; clients send mlflow:<port>.
    allowed = option(args, "--allowed-hosts").split(",")
    host = f"mlflow:{listen_port(resolved, 'mlflow')}"
    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), allowed

    env, minio = environment(mlflow), environment(resolved["minio"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def test_mlflow_image_matches_the_client() -> None:
    dockerfile = (ROOT / "deployments" / "mlflow.Dockerfile").read_text()
    assert f"mlflow=={version('mlflow')}" in dockerfile, "server and client MLflow versions differ"
    assert "boto3" in dockerfile, "without boto3 the server cannot store artifacts in S3"
    assert "psycopg2" in dockerfile, "the postgresql:// backend store needs psycopg2"


def test_prefect_server(resolved: dict[str, Any]) -> None:
    server = resolved["prefect-server"]
    # The worker and the flows run the project's Prefect; server and client stay in step.
    assert server["image"] == f"prefecthq/prefect:{version('prefect')}-python3.11"
    args = command(server)
    assert args[:3] == ["prefect", "server", "start"] and option(args, "--host") == "0.0.0.0"
    env = environment(server)
    db = urlsplit(env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert db.scheme == "postgresql+asyncpg" and db.hostname == "postgres"
    assert db.path.lstrip("/") in created_databases(resolved)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "false"


def test_label_studio(resolved: dict[str, Any], defaults: Settings) -> None:
    service = resolved["label-studio"]
    assert service["image"] == f"heartexlabs/label-studio:{defaults.label_studio_version}"
    env = environment(service)
    assert env["POSTGRE_HOST"] == "postgres" and env["POSTGRE_NAME"] in created_databases(resolved)
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"].lower() == "true"


def test_postgres_init_script_is_mounted(raw: dict[str, Any]) -> None:
    mounts = [str(volume) for volume in raw["postgres"].get("volumes", [])]
    init = [m for m in mounts if ":/docker-entrypoint-initdb.d/" in m]
    assert init, "postgres-init.sql is not mounted into /docker-entrypoint-initdb.d"
    assert (ROOT / init[0].split(":")[0]).resolve() == POSTGRES_INIT


# --- secrets -------------------------------------------------------------------------------------


def test_secrets_are_required_substitutions(raw: dict[str, Any]) -> None:
    required = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]*\}$")
    for name, service in raw.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_ENABLE_LEGACY_API_TOKEN"):
                assert required.match(value), (
                    f"{name}.{key} must be ${{VAR:?message}}, got {value!r}"
                )


def test_no_literal_password_in_urls(document: dict[str, Any]) -> None:
    for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", "\n".join(strings(document))):
        assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]*\}", password), (
            f"literal password for {user} in a URL: {password!r}"
        )


def test_secret_variables_have_no_default(document: dict[str, Any]) -> None:
    # `${X_PASSWORD:-something}` would be a hard-coded secret in disguise.
    for name, op, _arg in substitutions(document):
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must use :? (required), not {op!r}"


def test_env_example_holds_placeholders_only(
    document: dict[str, Any], example_env: dict[str, str]
) -> None:
    for name, _op, _arg in substitutions(document):
        if SECRET_NAME.search(name):
            assert name in example_env, f"{name} is not documented in deployments/.env.example"
            assert "change-me" in example_env[name], f"{name} in .env.example is not a placeholder"


# --- interpolation (what `docker compose config` does) ------------------------------------------


def test_env_example_interpolates_completely(
    document: dict[str, Any], example_env: dict[str, str]
) -> None:
    # interpolate() raises on anything it cannot resolve; what is left must hold no `${`
    # other than one written on purpose as the escape `$${`.
    written, resolved_values = strings(document), strings(interpolate_values(document, example_env))
    leftovers = [
        after
        for before, after in zip(written, resolved_values)
        if "${" in after and "$${" not in before
    ]
    assert not leftovers


@pytest.mark.parametrize(
    "secret",
    [
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "VISIONLOOP_API_TOKEN",
        "VISIONLOOP_API_READ_TOKEN",
        "VISIONLOOP_WEBHOOK_SECRET",
        "LABEL_STUDIO_PASSWORD",
        "LABEL_STUDIO_USER_TOKEN",
    ],
)
def test_missing_secret_stops_compose(
    secret: str, document: dict[str, Any], example_env: dict[str, str]
) -> None:
    env = dict(example_env)
    del env[secret]
    with pytest.raises(InterpolationError, match=secret):
        interpolate_values(document, env)


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:+alt} $$HOME", env)
        == "x d  d alt $HOME"
    )
    for text in ("${UNSET}", "${EMPTY:?need it}", "${UNSET?need it}", "$BARE", "${bad name}"):
        with pytest.raises(InterpolationError):
            interpolate(text, env)


# --- dependencies, health, volumes ---------------------------------------------------------------


def test_depends_on_targets_exist_and_are_checkable(raw: dict[str, Any]) -> None:
    for name, service in raw.items():
        deps = service.get("depends_on") or {}
        deps = (
            {dep: {"condition": "service_started"} for dep in deps}
            if isinstance(deps, list)
            else deps
        )
        for dep, spec in deps.items():
            assert dep in raw, f"{name} depends on unknown service {dep}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in raw[dep], (
                    f"{name} waits for {dep} to be healthy; it has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert raw[dep].get("restart", "no") == "no", (
                    f"{dep} is a one-shot job; it must not restart"
                )


@pytest.mark.parametrize("name", ["minio", "postgres"])
def test_healthchecks(name: str, raw: dict[str, Any]) -> None:
    assert raw[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_volumes(raw: dict[str, Any], document: dict[str, Any]) -> None:
    declared = set(document.get("volumes") or {})
    for name, service in raw.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} bind-mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_env_files_exist_or_are_optional(raw: dict[str, Any]) -> None:
    for name, service in raw.items():
        for entry in service.get("env_file") or []:
            path, required = (
                (entry, True)
                if isinstance(entry, str)
                else (entry["path"], entry.get("required", True))
            )
            if required:
                assert (ROOT / path).exists(), f"{name} requires env_file {path}"
            else:
                assert (ROOT / f"{path}.example").exists(), (
                    f"{name}: document {path} in {path}.example"
                )


# --- Dockerfiles ---------------------------------------------------------------------------------


def _builds() -> list[tuple[str, Path, Path]]:
    """(service, build context, Dockerfile) for every service built from this repo."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    builds = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (ROOT / build.get("context", ".")).resolve()
        builds.append((name, context, context / build.get("dockerfile", "Dockerfile")))
    return builds


def _instructions(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments dropped."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            args = yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest)
            result.append((keyword.upper(), args))
    return result


def _copied_sources() -> list[tuple[str, Path, str]]:
    """(Dockerfile relative to the repo, build context, source) for every COPY/ADD source."""
    found = []
    seen = set()
    for _name, context, dockerfile in _builds():
        if dockerfile in seen or not dockerfile.exists():
            continue
        seen.add(dockerfile)
        for keyword, args in _instructions(dockerfile):
            if keyword not in {"COPY", "ADD"} or any(a.startswith("--from") for a in args):
                continue
            sources = [a for a in args if not a.startswith("--")][
                :-1
            ]  # last one is the destination
            found += [(str(dockerfile.relative_to(ROOT)), context, src) for src in sources]
    return found


@pytest.mark.parametrize("name,context,dockerfile", _builds(), ids=[b[0] for b in _builds()])
def test_build_context_and_dockerfile_exist(name: str, context: Path, dockerfile: Path) -> None:
    assert context.is_dir(), f"{name}: build context {context} is missing"
    assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    users = [args for keyword, args in _instructions(dockerfile) if keyword == "USER"]
    assert users and users[-1][0] not in {
        "root",
        "0",
    }, f"{dockerfile.name} must run as a non-root user"


@pytest.mark.parametrize(
    "dockerfile,context,source",
    _copied_sources(),
    ids=[f"{d}:{s}" for d, _c, s in _copied_sources()],
)
def test_copied_path_exists(dockerfile: str, context: Path, source: str) -> None:
    # Directories only need to exist (their content is other engineers' code in progress).
    matches = list(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
    assert any(path.exists() for path in matches), (
        f"{dockerfile} copies {source}, which does not exist"
    )


def test_project_image_is_built_from_the_lock_file() -> None:
    dockerfile = ROOT / "deployments" / "Dockerfile"
    runs = [" ".join(args) for keyword, args in _instructions(dockerfile) if keyword == "RUN"]
    assert any("uv sync --frozen --no-dev" in run for run in runs)
    assert any(
        args[0] == "python:3.11-slim"
        for keyword, args in _instructions(dockerfile)
        if keyword == "FROM"
    )


def test_secrets_stay_out_of_the_project_image() -> None:
    # The context is the repo root and the image copies deployments/, where .env lives.
    ignore = ROOT / "deployments" / "Dockerfile.dockerignore"
    patterns = (
        {line.strip() for line in ignore.read_text().splitlines()} if ignore.exists() else set()
    )
    assert patterns & {
        "**/.env",
        "deployments/.env",
    }, f"{ignore.name} must exclude deployments/.env"
    assert ".venv" in patterns, f"{ignore.name} must exclude the local .venv"
