"""Idempotent provisioning of a running Label Studio for the review loop.

``provision`` turns "a Label Studio is listening at URL and its admin is U/W" into an
API token that ``label_studio_sdk.LabelStudio`` accepts plus the id of the review project,
whose labeling config carries exactly the detector's class names. Running it again gives
the same token and the same project.

Token mechanism: the admin's *legacy* API token (``Authorization: Token <key>``). Since
Label Studio 1.17 new organizations have legacy tokens switched off, so after a session
login (CSRF-protected form POST to ``/user/login/``) we switch them on for the organization
with ``POST /api/jwt/settings`` and read the key from ``GET /api/current-user/token``.
Unlike a personal access token (JWT refresh token from ``POST /api/token/``), the legacy key
can be read back at any time, so provisioning needs no state of its own and stays
idempotent (a user may hold only one PAT and its secret is shown once). A configured
token (``VISIONLOOP_LABEL_STUDIO_TOKEN``) may be either kind: the SDK handles both, and
``check_token`` checks it through the SDK.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, cast

import httpx
from label_studio_sdk.core.api_error import ApiError

from labeling.label_config import build_label_config, label_config_matches
from visionloop.settings import get_settings

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

__all__ = [
    "LabelStudioAccess",
    "LabelStudioError",
    "check_token",
    "client",
    "ensure_project",
    "obtain_token",
    "provision",
    "unreachable",
    "wait_until_ready",
]

URL_SETTINGS = "VISIONLOOP_LABEL_STUDIO_URL / VISIONLOOP_LABEL_STUDIO_PORT"
LOGIN_SETTINGS = "VISIONLOOP_LABEL_STUDIO_USERNAME / VISIONLOOP_LABEL_STUDIO_PASSWORD"
TOKEN_SETTING = "VISIONLOOP_LABEL_STUDIO_TOKEN"
PROJECT_SETTING = "VISIONLOOP_LABEL_STUDIO_PROJECT"
CLASSES_SETTING = "VISIONLOOP_CLASS_NAMES"

DEFAULT_TIMEOUT = 30.0
"""Seconds for any single HTTP request to Label Studio."""


class LabelStudioError(RuntimeError):
    """Label Studio is unreachable, refuses our credentials, or refuses a change."""


@dataclass(frozen=True)
class LabelStudioAccess:
    url: str
    token: str
    project_id: int


def _base(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LabelStudioError(
            f"Label Studio URL {url!r} must start with http:// or https:// (set {URL_SETTINGS})"
        )
    return url


def _secret(value: Any) -> str:
    """Plain string of a str or a pydantic ``SecretStr``."""
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else str(value or "")


def unreachable(url: str, exc: BaseException) -> LabelStudioError:
    return LabelStudioError(
        f"cannot reach Label Studio at {url}: {type(exc).__name__}: {exc or 'no detail'}. "
        f"Is it running? Check {URL_SETTINGS}."
    )


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip()
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "label_config"):
            if key in body:
                return str(body[key])
    return str(body)[:300]


def _api_detail(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        for key in ("validation_errors", "detail", "label_config"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


# --- liveness ---------------------------------------------------------------------------


def wait_until_ready(url: str, timeout: float = 120.0) -> None:
    """Poll ``<url>/health`` until Label Studio answers ``200``, else raise after ``timeout`` s."""
    base = _base(url)
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            response = httpx.get(
                f"{base}/health", timeout=max(0.5, min(5.0, remaining)), follow_redirects=True
            )
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code} from /health"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc or 'no detail'}"
        if time.monotonic() + 0.5 >= deadline:
            raise LabelStudioError(
                f"Label Studio at {base} did not become ready within {timeout:g} s ({last}). "
                f"Is it running and do {URL_SETTINGS} point at it?"
            )
        time.sleep(0.5)


# --- tokens -----------------------------------------------------------------------------


def _login(session: httpx.Client, base: str, username: str, password: str) -> None:
    """Session login through Label Studio's own login form (Django, CSRF protected)."""
    page = session.get("/user/login/")
    if page.status_code != 200:
        raise LabelStudioError(
            f"{base}/user/login/ answered HTTP {page.status_code}: is {base} a Label Studio? "
            f"Check {URL_SETTINGS}."
        )
    csrf = session.cookies.get("csrftoken")
    if not csrf:
        raise LabelStudioError(
            f"{base}/user/login/ set no csrftoken cookie: is {base} a Label Studio?"
        )
    response = session.post(
        "/user/login/",
        data={"csrfmiddlewaretoken": csrf, "email": username, "password": password},
        headers={"Referer": f"{base}/user/login/", "X-CSRFToken": csrf},
    )
    # Success redirects (302) to the app; a failed login re-renders the form with 200.
    who = (
        session.get("/api/current-user/whoami") if response.status_code in (301, 302, 303) else None
    )
    if who is None or who.status_code != 200:
        raise LabelStudioError(
            f"Label Studio at {base} rejected the login of {username!r} "
            f"(HTTP {response.status_code}). Check {LOGIN_SETTINGS}; note that Label Studio "
            "creates its admin only on its first start and never changes that password later."
        )


def obtain_token(url: str, username: str, password: Any, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Log in as ``username`` and return its API token, enabling API tokens where disabled.

    ``password`` may be a ``str`` or a pydantic ``SecretStr``.
    """
    base = _base(url)
    if not username or not _secret(password):
        raise LabelStudioError(
            f"need a username and password to log in to Label Studio at {base}: set "
            f"{LOGIN_SETTINGS} (or give a token with {TOKEN_SETTING})"
        )
    try:
        with httpx.Client(base_url=base, timeout=timeout, follow_redirects=False) as session:
            _login(session, base, username, _secret(password))
            csrf_headers = {
                "X-CSRFToken": session.cookies.get("csrftoken") or "",
                "Referer": f"{base}/",
            }
            current = session.get("/api/jwt/settings")
            wanted = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
            if current.status_code != 200 or any(
                current.json().get(key) is not True for key in wanted
            ):
                updated = session.post("/api/jwt/settings", json=wanted, headers=csrf_headers)
                if updated.status_code not in (200, 201):
                    raise LabelStudioError(
                        f"Label Studio at {base} refused to enable API tokens for {username!r} "
                        f"(HTTP {updated.status_code}: {_detail(updated)}); the user must be "
                        f"allowed to change its organization. Check {LOGIN_SETTINGS}, or give a "
                        f"working token with {TOKEN_SETTING}."
                    )
            answer = session.get("/api/current-user/token")
            token = answer.json().get("token") if answer.status_code == 200 else None
            if not token:
                raise LabelStudioError(
                    f"Label Studio at {base} returned no API token for {username!r} "
                    f"(HTTP {answer.status_code}: {_detail(answer)})"
                )
    except httpx.TransportError as exc:
        raise unreachable(base, exc) from exc
    check_token(base, token, timeout=timeout)
    return str(token)


def client(url: str, token: Any, timeout: float | None = None) -> LabelStudio:
    """A ``label_studio_sdk`` client for ``url`` authenticated by ``token`` (legacy or PAT).

    Each request waits at most ``timeout`` (default ``VISIONLOOP_SERVICE_TIMEOUT_S``) and a
    refused connection is retried ``VISIONLOOP_SERVICE_RETRIES`` times, so a Label Studio that
    is down is reported within a bounded time.
    """
    settings = get_settings()
    try:
        return _client_class()(
            base_url=_base(url),
            api_key=_secret(token),
            timeout=settings.service_timeout_s if timeout is None else timeout,
            max_retries=settings.service_retries,
        )
    except ApiError as exc:  # an expired personal access token fails at construction
        raise LabelStudioError(
            f"Label Studio token rejected: {_api_detail(exc)}. Check {TOKEN_SETTING}."
        ) from exc


@cache
def _client_class() -> type[LabelStudio]:
    """``label_studio_sdk.LabelStudio`` without its import-time cost.

    The SDK's ``LabelStudio`` imports its projects extension at import: the label interface,
    ``jsf``, ``smart_open``, ``boto3`` and ``pandas``, seconds that every label-sync run paid
    for two features the loop never uses (``get_label_interface`` and the export helpers).
    This client is the SDK's base client plus what the extensions give that does matter here:
    list pagers that end quietly on the 404 Label Studio answers past the last page.
    """
    from label_studio_sdk._extensions.pager_ext import SyncPagerExt
    from label_studio_sdk.base_client import LabelStudioBase
    from label_studio_sdk.projects.client import ProjectsClient
    from label_studio_sdk.tasks.client_ext import TasksClientExt

    class Projects(ProjectsClient):
        def list(self, **kwargs: Any) -> SyncPagerExt[Any]:  # type: ignore[override]
            return SyncPagerExt.from_sync_pager(super().list(**kwargs))

    class Client(LabelStudioBase):
        _tasks_ext: TasksClientExt | None = None
        _projects_ext: Projects | None = None

        @property
        def tasks(self) -> TasksClientExt:  # type: ignore[override]
            if self._tasks_ext is None:
                self._tasks_ext = TasksClientExt(client_wrapper=self._client_wrapper)
            return self._tasks_ext

        @property
        def projects(self) -> Projects:  # type: ignore[override]
            if self._projects_ext is None:
                self._projects_ext = Projects(client_wrapper=self._client_wrapper)
            return self._projects_ext

    return cast("type[LabelStudio]", Client)


def check_token(url: str, token: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise ``LabelStudioError`` naming ``VISIONLOOP_LABEL_STUDIO_TOKEN`` unless it works."""
    base = _base(url)
    if not _secret(token):
        raise LabelStudioError(f"empty Label Studio token: set {TOKEN_SETTING}")
    try:
        client(base, token, timeout=timeout).users.whoami()
    except ApiError as exc:
        if exc.status_code in (401, 403):
            detail = _api_detail(exc)
            hint = ""
            if "legacy token" in detail:
                hint = (
                    " Legacy tokens are disabled for this organization; provisioning with "
                    f"{LOGIN_SETTINGS} (and {TOKEN_SETTING} empty) enables them."
                )
            raise LabelStudioError(
                f"Label Studio at {base} rejected the API token (HTTP {exc.status_code}: "
                f"{detail}). Check {TOKEN_SETTING}.{hint}"
            ) from exc
        raise LabelStudioError(
            f"Label Studio at {base} failed to check the API token "
            f"(HTTP {exc.status_code}: {_api_detail(exc)})"
        ) from exc
    except httpx.TransportError as exc:
        raise unreachable(base, exc) from exc


# --- the review project -----------------------------------------------------------------


def ensure_project(
    url: str, token: Any, title: str, class_names: list[str], timeout: float | None = None
) -> int:
    """Id of the project titled ``title``, created or updated to label exactly ``class_names``.

    Refuses (``LabelStudioError``) to drop labels that annotations or drafts still use, the
    check Label Studio's own UI makes before saving a config (its REST update does not).
    """
    base = _base(url)
    if not title or not title.strip():
        raise LabelStudioError(f"empty Label Studio project title: set {PROJECT_SETTING}")
    try:
        config = build_label_config(list(class_names))
    except ValueError as exc:
        raise LabelStudioError(f"{exc} (check {CLASSES_SETTING})") from exc
    ls = client(base, token, timeout=timeout)
    step = "list projects"
    try:
        # ``title`` filters case-insensitively by substring; keep exact matches only.
        found = sorted(
            (p for p in ls.projects.list(title=title, page_size=100) if p.title == title),
            key=lambda p: p.id,
        )
        if not found:
            step = f"create project {title!r}"
            created = ls.projects.create(title=title, label_config=config)
            return int(created.id)
        project_id = int(found[0].id)  # several with one title: the oldest is ours
        current = found[0].label_config or ls.projects.get(id=project_id).label_config or ""
        if not label_config_matches(current, list(class_names)):
            step = f"validate the new label config of project {project_id} ({title!r})"
            try:
                ls.projects.validate_label_config(id=project_id, label_config=config)
            except ApiError as exc:
                if exc.status_code == 400:
                    raise LabelStudioError(
                        f"cannot change the labels of Label Studio project {project_id} "
                        f"({title!r}) at {base} to {list(class_names)}: {_api_detail(exc)} "
                        f"Keep those classes in {CLASSES_SETTING}, or delete/relabel the "
                        "annotations that use them first."
                    ) from exc
                raise
            step = f"update the label config of project {project_id} ({title!r})"
            ls.projects.update(id=project_id, label_config=config)
        return project_id
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {base} rejected the API token while trying to {step} "
                f"(HTTP {exc.status_code}: {_api_detail(exc)}). Check {TOKEN_SETTING}."
            ) from exc
        raise LabelStudioError(
            f"Label Studio at {base} failed to {step} (HTTP {exc.status_code}: "
            f"{_api_detail(exc)}). Check {PROJECT_SETTING} and {CLASSES_SETTING}."
        ) from exc
    except httpx.TransportError as exc:
        raise unreachable(base, exc) from exc


def provision(
    url: str,
    username: str,
    password: Any,
    title: str,
    class_names: list[str],
    token: Any = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> LabelStudioAccess:
    """Token plus review project for a running Label Studio; safe to run again.

    A non-empty ``token`` (``VISIONLOOP_LABEL_STUDIO_TOKEN``) is checked and used as is;
    otherwise one is obtained by logging in with ``username``/``password``.
    """
    base = _base(url)
    if _secret(token):
        check_token(base, token, timeout=timeout)
        key = _secret(token)
    else:
        key = obtain_token(base, username, password, timeout=timeout)
    project_id = ensure_project(base, key, title, class_names, timeout=max(timeout, 60.0))
    return LabelStudioAccess(url=base, token=key, project_id=project_id)
