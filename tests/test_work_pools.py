"""The docker and kubernetes work-pool variants (deployments/) checked without Docker or a cluster.

A variant is the deployment file `visionloop deployments render POOL` writes from prefect.yaml
and the pool's overlay (deployments/work-pools/POOL.yaml); every check below reads that file.
Each variant must deploy exactly prefect.yaml's flows (same names, entrypoints, schedules,
parameters, concurrency) onto a pool of the right type, run the image docker-compose.yml
builds, and hand flow runs settings that `visionloop.settings.Settings` accepts, wired like
the compose stack. Job variables are validated the way the Prefect server validates them on
`prefect deploy` (against the pool's base job template, with Prefect's own validator); the
default templates of the docker and kubernetes workers come from the worker metadata bundled
with the installed Prefect, so neither prefect-docker nor prefect-kubernetes is needed. The
Kubernetes Job a flow run gets is rendered from the template as the worker renders it.
"""

from __future__ import annotations

import io
import json
import os
import re
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_compose import environment, interpolate_values, parse_env_file, settings_from
from typer.testing import CliRunner

from cli import recipes
from visionloop.settings import Settings, get_settings

# Prefect is imported inside the tests, never at collection: importing it fixes its settings
# (the API URL) for the whole process, before the session's stack has started.

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
VARIANTS = ("docker", "kubernetes")
POOLS = {"docker": "visionloop-docker", "kubernetes": "visionloop-kubernetes"}
K8S_TEMPLATE = DEPLOYMENTS / "work-pools" / "kubernetes.json"
K8S_DIR = DEPLOYMENTS / "k8s"
NAMESPACE = "visionloop"
PREFIX = Settings.model_config["env_prefix"]  # "VISIONLOOP_"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|DATABASE_URL")
TRAINING = {"bootstrap", "train", "evaluate", "retrain"}
# What must be the same in every variant: the flow, when it runs, and with what.
SAME = ("entrypoint", "schedules", "parameters", "concurrency_limit", "description")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs])
    return found[0]


def apply_values(template: Any, values: dict[str, Any], **options: Any) -> Any:
    from prefect.utilities.templating import apply_values

    return apply_values(template, values, **options)


def find_placeholders(template: Any) -> set[Any]:
    from prefect.utilities.templating import find_placeholders

    return find_placeholders(template)


def bundled_template(worker_type: str) -> dict[str, Any]:
    """The default base job template Prefect's server gives a new pool of ``worker_type``."""
    path = files("prefect.server.api.collections_data") / "views/aggregate-worker-metadata.json"
    metadata = json.loads(path.read_text())
    for workers in metadata.values():
        if worker_type in workers:
            return workers[worker_type]["default_base_job_configuration"]
    raise LookupError(worker_type)


POOL_TEMPLATES = {
    "docker": lambda: bundled_template("docker"),
    "kubernetes": lambda: json.loads(K8S_TEMPLATE.read_text()),
}


def defaults_of(template: dict[str, Any]) -> dict[str, Any]:
    props = template["variables"].get("properties", {})
    return {name: spec["default"] for name, spec in props.items() if "default" in spec}


def quantity(value: str) -> float:
    """A Kubernetes or Docker size/CPU quantity as a number (bytes or cores)."""
    units = {"m": 1e-3, "k": 1e3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "g": 2**30, "M": 1e6}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1)


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    return load(ROOT / "prefect.yaml")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def compose_env(compose: dict[str, Any]) -> dict[str, str]:
    """The project containers' environment, as `docker compose --env-file .env.example` sets it."""
    resolved = interpolate_values(compose, parse_env_file(DEPLOYMENTS / ".env.example"))
    return environment(resolved["services"]["prefect-worker"])


@pytest.fixture(scope="module")
def project_settings() -> Any:
    """The CLI's settings pointed at this checkout (a stack session may have set others)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISIONLOOP_PROJECT_DIR", str(ROOT))
        get_settings.cache_clear()
        yield get_settings()
    get_settings.cache_clear()


def render_cli(*args: str) -> str:
    result = CliRunner().invoke(recipes.deployments_app, ["render", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def rendered(project_settings: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files `visionloop deployments render POOL --output FILE` writes."""
    folder = tmp_path_factory.mktemp("rendered")
    paths = {variant: folder / f"prefect.{variant}.yaml" for variant in VARIANTS}
    for variant, path in paths.items():
        assert render_cli(variant, "--output", str(path)) == ""
    return paths


@pytest.fixture(scope="module")
def variants(rendered: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {name: load(path) for name, path in rendered.items()}


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in document["deployments"]}


def job_env(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["work_pool"]["job_variables"]["env"]


# --- the deployments ---------------------------------------------------------------------------


def test_every_overlay_is_a_tested_variant() -> None:
    assert recipes.pool_types(ROOT) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefect_reads_the_file(
    variant: str, variants: dict[str, Any], rendered: dict[str, Path]
) -> None:
    """The model `prefect deploy` validates a prefect.yaml with, the loader it reads the file
    with (which skips an invalid file with a warning), and the project's version."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._models import PrefectYamlModel
    from rich.console import Console

    document = variants[variant]
    model = PrefectYamlModel.model_validate(document)
    assert len(model.deployments) == len(document["deployments"])
    log = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(
        prefect_file=rendered[variant], console=Console(file=log)
    )
    assert not log.getvalue(), log.getvalue()
    assert [c["name"] for c in configs] == [d["name"] for d in document["deployments"]]
    assert actions["pull"] == document["pull"]
    assert document["prefect-version"] == version("prefect")
    # The code is in the image: the flows run from /app, where deployments/Dockerfile puts it.
    assert document["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_deployment_of_prefect_yaml_is_there_unchanged(
    variant: str, variants: dict[str, Any], recipe: dict[str, Any]
) -> None:
    wanted, got = by_name(recipe), by_name(variants[variant])
    assert list(got) == list(wanted)
    for name, deployment in wanted.items():
        for key in SAME:
            assert got[name].get(key) == deployment.get(key), (variant, name, key)
        # Nothing but the pool differs, so nothing else has a second home.
        assert {k: v for k, v in got[name].items() if k != "work_pool"} == {
            k: v for k, v in deployment.items() if k != "work_pool"
        }, (variant, name)
        for entry in [deployment["entrypoint"]]:
            assert (ROOT / entry.split(":")[0]).is_file()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_pool_per_variant_and_its_type(variant: str, variants: dict[str, Any]) -> None:
    pool = POOLS[variant]
    assert {d["work_pool"]["name"] for d in variants[variant]["deployments"]} == {pool}
    # The flow runs know their pool (the API's worker health check reads it).
    for deployment in variants[variant]["deployments"]:
        assert job_env(deployment)["VISIONLOOP_PREFECT_WORK_POOL"] == pool
    # The README creates it with that type; the worker starts with that pool and type.
    readme = (DEPLOYMENTS / "README.md").read_text()
    assert re.search(rf"prefect work-pool create {pool} --type {variant}\b", readme), pool
    deploy = rf"visionloop deployments deploy {variant}\b"
    assert re.search(deploy, readme), deploy
    if variant == "docker":
        worker = load(DEPLOYMENTS / "compose.docker-pool.yml")["services"]["docker-worker"]
        args = worker["command"]
    else:
        worker = of_kind(load_all(K8S_DIR / "worker.yaml"), "Deployment")
        args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == pool
    assert args[args.index("--type") + 1] == variant


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flow_runs_use_the_image_compose_builds(
    variant: str, variants: dict[str, Any], compose: dict[str, Any]
) -> None:
    app = compose["x-visionloop-app"]
    assert app["build"]["dockerfile"] == "deployments/Dockerfile"
    for service in ("api", "prefect-worker", "migrate"):
        assert compose["services"][service]["image"] == app["image"]
    for deployment in variants[variant]["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        assert variables["image"] == app["image"], deployment["name"]
    policies = {
        d["work_pool"]["job_variables"]["image_pull_policy"]
        for d in variants[variant]["deployments"]
    }
    # Docker: built on the worker's host, never pulled. Kubernetes: loaded or pulled once.
    assert policies == {"Never" if variant == "docker" else "IfNotPresent"}


def test_workers_run_the_prefect_of_the_lock_file(compose: dict[str, Any]) -> None:
    server = compose["services"]["prefect-server"]["image"]
    assert server == f"prefecthq/prefect:{version('prefect')}-python3.11"
    docker_worker = load(DEPLOYMENTS / "compose.docker-pool.yml")["services"]["docker-worker"]
    assert docker_worker["image"] == server
    assert "/var/run/docker.sock:/var/run/docker.sock" in docker_worker["volumes"]
    assert docker_worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    k8s = of_kind(load_all(K8S_DIR / "worker.yaml"), "Deployment")
    [container] = k8s["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{server}-kubernetes"


# --- rendering and deploying -------------------------------------------------------------------


def test_an_overlay_may_only_name_deployments_of_prefect_yaml(recipe: dict[str, Any]) -> None:
    """A deployment renamed in prefect.yaml must not leave its pool settings behind unused."""
    overlay = recipes.load_overlay(ROOT, "docker")
    stale = overlay.model_copy(update={"job_variables_by_deployment": {"retrian": {}}})
    with pytest.raises(recipes.RecipeError, match="retrian"):
        recipes.render(recipe, stale)


def test_an_overlay_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / recipes.OVERLAYS
    folder.mkdir(parents=True)
    text = (DEPLOYMENTS / "work-pools" / "docker.yaml").read_text()
    (folder / "docker.yaml").write_text(text.replace("job_variables_by_deployment:", "by_name:"))
    with pytest.raises(recipes.RecipeError, match="by_name"):
        recipes.load_overlay(tmp_path, "docker")
    with pytest.raises(recipes.RecipeError, match="known pool types: docker"):
        recipes.load_overlay(tmp_path, "nomad")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_command_line_job_variables_win_on_every_deployment(
    variant: str, variants: dict[str, Any], project_settings: Any
) -> None:
    """`prefect deploy --all` ignores --job-variable; the render command applies it."""
    image = "registry.example/visionloop:1.2"
    document = yaml.safe_load(
        render_cli(variant, "--job-variable", f"image={image}", "--job-variable", "x=a=b")
    )
    for deployment, before in zip(document["deployments"], variants[variant]["deployments"]):
        assert deployment["work_pool"]["job_variables"] == {
            **before["work_pool"]["job_variables"],
            "image": image,
            "x": "a=b",
        }
    result = CliRunner().invoke(recipes.deployments_app, ["render", variant, "--job-variable", "x"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_the_visionloop_command_offers_it(project_settings: Any) -> None:
    from cli.app import app

    result = CliRunner().invoke(app, ["deployments", "render", "docker"])
    assert result.exit_code == 0, result.output
    assert result.output == render_cli("docker")


# --- settings -------------------------------------------------------------------------------------


def _unknown_settings(names: set[str]) -> list[str]:
    fields = set(Settings.model_fields)
    return sorted(
        n for n in names if n.startswith(PREFIX) and n.removeprefix(PREFIX).lower() not in fields
    )


def _placeholders(value: str) -> set[str]:
    return {p.name.lstrip("$") for p in find_placeholders(value)}


def test_env_names_are_settings_fields(variants: dict[str, Any]) -> None:
    names: set[str] = set()
    for document in variants.values():
        for deployment in document["deployments"]:
            env = job_env(deployment)
            names |= set(env)
            for value in env.values():
                names |= _placeholders(str(value))
    for doc in load_all(K8S_DIR / "dask.yaml") + load_all(K8S_DIR / "secrets.example.yaml"):
        if doc["kind"] == "Secret":
            names |= set(doc["stringData"])
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in container.get("env", [])}
    readme = (DEPLOYMENTS / "README.md").read_text()
    names |= set(re.findall(r"\bVISIONLOOP_[A-Z0-9_]+", readme))
    assert names and not _unknown_settings(names)
    assert {"VISIONLOOP_TASK_RUNNER", "VISIONLOOP_DASK_ADDRESS", "VISIONLOOP_DASK_WORKERS"} <= names


def test_docker_flow_runs_get_the_compose_wiring(
    variants: dict[str, Any], compose_env: dict[str, str]
) -> None:
    """Same names as the compose containers; addresses fixed to the same services; every
    credential a `{{ $NAME }}` that `prefect deploy`, run in the compose prefect-worker
    container, fills from that container's own environment."""
    for deployment in variants["docker"]["deployments"]:
        env = job_env(deployment)
        assert set(env) - {"VISIONLOOP_TASK_RUNNER", "VISIONLOOP_DASK_WORKERS"} == set(compose_env)
        for name, value in env.items():
            placeholders = _placeholders(str(value))
            if SECRET_NAME.search(name):
                assert placeholders == {name}, f"{name} must come from the deployer's environment"
            if placeholders:
                assert placeholders <= set(compose_env), placeholders
                continue
            expected = (
                POOLS["docker"] if name == "VISIONLOOP_PREFECT_WORK_POOL" else compose_env[name]
            )
            assert str(value) == expected, name
        # What the flow run gets once `prefect deploy` has filled the placeholders in, from
        # its own environment (templating exactly as `prefect deploy` does).
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                mp.delenv(key)
            for key, value in compose_env.items():
                mp.setenv(key, value)
            filled = apply_values(env, dict(os.environ), remove_notset=False)
        assert not find_placeholders(json.dumps(filled))
        assert filled == {**compose_env, "VISIONLOOP_PREFECT_WORK_POOL": POOLS["docker"]} | {
            k: v for k, v in env.items() if k not in compose_env
        }
        settings = settings_from(filled)
        assert settings.db_url.startswith("postgresql://") and "@postgres:5432/" in settings.db_url
        assert (
            settings.s3_host == "minio:9000" and settings.label_studio == "http://label-studio:8080"
        )


def _secret() -> dict[str, Any]:
    return of_kind(load_all(K8S_DIR / "secrets.example.yaml"), "Secret")


def test_kubernetes_flow_runs_get_addresses_in_env_and_credentials_from_the_secret(
    variants: dict[str, Any], compose_env: dict[str, str]
) -> None:
    secret = _secret()
    assert secret["metadata"]["namespace"] == NAMESPACE
    secret_keys = set(secret["stringData"])
    assert all(SECRET_NAME.search(k) for k in secret_keys)
    for deployment in variants["kubernetes"]["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        env = job_env(deployment)
        assert variables["secret_name"] == secret["metadata"]["name"]
        assert variables["namespace"] == NAMESPACE
        assert not any(SECRET_NAME.search(k) for k in env), "credentials belong in the Secret"
        extra = {"VISIONLOOP_TASK_RUNNER", "VISIONLOOP_DASK_ADDRESS", "VISIONLOOP_DASK_WORKERS"}
        assert (set(env) - extra) | secret_keys == set(compose_env)
        assert not set(env) & secret_keys
        for name, value in env.items():
            if name in compose_env and name != "VISIONLOOP_PREFECT_WORK_POOL":
                assert str(value) == compose_env[name], name
        settings = settings_from({**env, **secret["stringData"]})
        assert settings.mlflow_uri == "http://mlflow:5000" and settings.api_host == "api"


def test_ingest_fans_out_over_the_dask_cluster_of_the_manifest(variants: dict[str, Any]) -> None:
    docs = load_all(K8S_DIR / "dask.yaml")
    service = of_kind(docs, "Service", "visionloop-dask-scheduler")
    port = service["spec"]["ports"][0]["port"]
    ingest = by_name(variants["kubernetes"])["ingest"]
    settings = settings_from(job_env(ingest))
    assert settings.task_runner == "dask"
    assert settings.dask_address == f"tcp://{service['metadata']['name']}:{port}"
    # Everything else runs its tasks in the flow's own process.
    for deployment in variants["kubernetes"]["deployments"] + variants["docker"]["deployments"]:
        if deployment is not ingest:
            assert settings_from(job_env(deployment)).task_runner == "threads", deployment["name"]

    scheduler = of_kind(docs, "Deployment", "visionloop-dask-scheduler")
    assert service["spec"]["selector"] == scheduler["spec"]["template"]["metadata"]["labels"] | {}
    worker = of_kind(docs, "Deployment", "visionloop-dask-worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["dask", "worker", settings.dask_address]
    assert container["image"] == ingest["work_pool"]["job_variables"]["image"]
    # A batch on a Dask worker sees exactly the settings a flow run sees.
    base_env = {
        k: v for k, v in job_env(ingest).items() if "DASK" not in k and "TASK_RUNNER" not in k
    }
    assert {e["name"]: e["value"] for e in container["env"]} == base_env
    assert container["envFrom"] == [{"secretRef": {"name": _secret()["metadata"]["name"]}}]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE


# --- job variables against the pools' base job templates -----------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_job_variables_pass_the_servers_validation(variant: str, variants: dict[str, Any]) -> None:
    """What the Prefect server checks when `prefect deploy` registers a deployment."""
    from prefect.utilities.schema_tools.validation import is_valid_schema, validate

    template = POOL_TEMPLATES[variant]()
    is_valid_schema(template["variables"], preprocess=False)
    for deployment in variants[variant]["deployments"]:
        values = {**defaults_of(template), **deployment["work_pool"]["job_variables"]}
        validate(
            values,
            template["variables"],
            raise_on_error=True,
            preprocess=True,
            ignore_required=True,
            allow_none_with_default=True,
        )
        assert set(deployment["work_pool"]["job_variables"]) <= set(
            template["variables"]["properties"]
        ), deployment["name"]


def test_training_gets_more_resources_than_the_rest(variants: dict[str, Any]) -> None:
    docker = {d["name"]: d["work_pool"]["job_variables"] for d in variants["docker"]["deployments"]}
    k8s = {
        d["name"]: d["work_pool"]["job_variables"] for d in variants["kubernetes"]["deployments"]
    }
    for name in docker:
        assert quantity(docker[name]["mem_limit"]) > 0
        requests = {k: quantity(k8s[name][k]) for k in ("cpu_request", "memory_request")}
        limits = {k: quantity(k8s[name][k]) for k in ("cpu_limit", "memory_limit")}
        assert limits["cpu_limit"] >= requests["cpu_request"]
        assert limits["memory_limit"] >= requests["memory_request"]
    for name in TRAINING:
        for other in set(docker) - TRAINING:
            assert quantity(docker[name]["mem_limit"]) > quantity(docker[other]["mem_limit"])
            assert quantity(k8s[name]["memory_limit"]) > quantity(k8s[other]["memory_limit"])
            assert quantity(k8s[name]["cpu_request"]) > quantity(k8s[other]["cpu_request"])
        assert quantity(k8s[name]["memory_limit"]) >= 4 * 2**30
    # Training asks Kubernetes for one NVIDIA GPU; nothing else holds one.
    assert {name for name in k8s if "gpu_limit" in k8s[name]} == TRAINING
    assert {quantity(k8s[name]["gpu_limit"]) for name in TRAINING} == {1}


def test_the_kubernetes_template_extends_the_workers_default() -> None:
    """Every variable and job field of prefect-kubernetes' default template is still there
    (the installed worker fills them), plus the Secret, the scratch volume and a GPU limit."""
    ours, default = json.loads(K8S_TEMPLATE.read_text()), bundled_template("kubernetes")
    props, default_props = ours["variables"]["properties"], default["variables"]["properties"]
    for name, spec in default_props.items():
        assert props[name].get("type") == spec.get("type"), name
    assert set(props) - set(default_props) == {"secret_name", "data_size_limit", "gpu_limit"}
    assert set(ours["job_configuration"]) == set(default["job_configuration"])
    manifest, default_manifest = (t["job_configuration"]["job_manifest"] for t in (ours, default))
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    [default_container] = default_manifest["spec"]["template"]["spec"]["containers"]
    kept = json.loads(json.dumps({k: v for k, v in container.items() if k in default_container}))
    # The one change to the default's fields: a GPU limit, dropped where no value is given.
    assert kept["resources"]["limits"].pop("nvidia.com/gpu") == "{{ gpu_limit }}"
    assert kept == default_container


@pytest.mark.parametrize("name", ["ingest", "train", "drift"])
def test_the_job_a_kubernetes_flow_run_gets(name: str, variants: dict[str, Any]) -> None:
    """The Job manifest rendered as the worker renders it (defaults, then the deployment's
    job variables, placeholders without a value dropped)."""
    template = json.loads(K8S_TEMPLATE.read_text())
    variables = by_name(variants["kubernetes"])[name]["work_pool"]["job_variables"]
    rendered = apply_values(template["job_configuration"], {**defaults_of(template), **variables})
    assert not find_placeholders(json.dumps(rendered)), "a template variable has no value"
    job = rendered["job_manifest"]
    assert job["metadata"]["namespace"] == rendered["namespace"] == NAMESPACE
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's unprivileged user
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["image"] == variables["image"]
    assert container["imagePullPolicy"] == variables["image_pull_policy"]
    assert container["env"] == variables["env"] == rendered["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "visionloop-secrets"}}]
    # A GPU only where the deployment asks for one: without `gpu_limit` the key is dropped,
    # so the pod still fits nodes without NVIDIA's device plugin.
    gpu = {"nvidia.com/gpu": "1"} if name in TRAINING else {}
    assert container["resources"] == {
        "limits": {"cpu": variables["cpu_limit"], "memory": variables["memory_limit"], **gpu},
        "requests": {"cpu": variables["cpu_request"], "memory": variables["memory_request"]},
    }
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount == {"name": volume["name"], "mountPath": variables["env"]["VISIONLOOP_DATA_DIR"]}
    assert volume["emptyDir"]["sizeLimit"] == variables.get("data_size_limit", "20Gi")


def test_the_kubernetes_worker_may_do_what_it_must_and_no_more() -> None:
    docs = load_all(K8S_DIR / "worker.yaml")
    account = of_kind(docs, "ServiceAccount")
    role = of_kind(docs, "Role")
    binding = of_kind(docs, "RoleBinding")
    deployment = of_kind(docs, "Deployment")
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    allowed = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {"create", "get", "list", "watch", "delete"} <= allowed[("batch", "jobs")]
    assert {"get", "list", "watch"} <= allowed[("", "pods")] and ("", "pods/log") in allowed
    assert not any("*" in verbs for verbs in allowed.values())
    assert not any(resource == "secrets" for _, resource in allowed)
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # A namespaced Role: the worker's observer must watch this namespace only.
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE
    assert env.get("PREFECT_KUBERNETES_CLUSTER_UID")
