"""The review project's connections: where Label Studio reads images, whom it tells of edits.

- **Images**: an S3 import storage on the project pointing at the platform's images bucket,
  with ``presign`` off. Tasks then name images as ``s3://<images bucket>/<key>`` and Label
  Studio streams the bytes to the reviewer's browser itself. The browser only needs to
  reach Label Studio (not the object store), and nothing expires, unlike presigned URLs
  (at most 7 days with S3 signatures) that a queue can easily outlive. The storage is
  never synced: tasks are created by the ingest flow only.
- **Webhook**: annotation and task events are POSTed to the API's
  ``/api/labeling/webhook`` with the webhook secret as bearer token, so reviewed labels arrive
  within seconds; the label-sync flow reconciles whatever a webhook missed. Every Label Studio
  user can read a webhook's headers, so they carry a secret that opens this one route only,
  never the API token.

Both are ensured idempotently every time tasks are queued; a caller that queues one image at
a time (the API, for each flagged prediction) uses ``wired_project``, which remembers a wiring
it ensured for ``WIRING_RECHECK_S`` instead of asking Label Studio five questions per image.

Label Studio refuses private and loopback addresses for both by default (its SSRF
protection); the object store and the API of a self-hosted platform live on exactly such
addresses, so Label Studio must run with its default bans rebuilt minus those two addresses
(``cli.stack.label_studio_ssrf_env``; ``LabelStudioError`` says so when they are banned).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from label_studio_sdk.core.api_error import ApiError

from labeling.provision import LabelStudioError, client, ensure_project
from visionloop.settings import Settings

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

STORAGE_TITLE = "visionloop images"
WEBHOOK_PATH = "/api/labeling/webhook"
WEBHOOK_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "TASKS_DELETED",
)
_SSRF_HINT = (
    "Label Studio refuses to connect to {url}: {detail}. Its SSRF protection bans private "
    "and loopback addresses, where a self-hosted object store and API live: start Label "
    "Studio with USE_DEFAULT_BANNED_SUBNETS=false and USER_ADDITIONAL_BANNED_SUBNETS set to "
    "its default list minus the addresses of the object store and the API."
)


@dataclass(frozen=True)
class ReviewProject:
    ls: LabelStudio
    id: int


def review_project(settings: Settings) -> ReviewProject:
    """The SDK client and the id of the review project (created if missing)."""
    token = settings.label_studio_token
    project_id = ensure_project(
        settings.label_studio, token, settings.label_studio_project, settings.class_names
    )
    return ReviewProject(client(settings.label_studio, token), project_id)


def image_uri(settings: Settings, key: str) -> str:
    """How a task names an image in the images bucket (resolved by the storage below)."""
    return f"s3://{settings.bucket_images}/{key}"


def _refused(exc: ApiError, url: str) -> LabelStudioError:
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = str(body.get("detail") or body or exc)
    if "reserved network address" in detail:
        return LabelStudioError(_SSRF_HINT.format(url=url, detail=detail))
    return LabelStudioError(f"Label Studio refused the connection to {url}: {detail}")


def ensure_image_storage(settings: Settings, project: ReviewProject) -> int:
    """Id of the project's S3 storage for the images bucket, created or re-pointed.

    Only the endpoint is compared: Label Studio never returns the stored credentials.
    """
    endpoint = settings.s3_url
    wanted = dict(
        title=STORAGE_TITLE,
        description="Images queued by visionloop's ingest flow; never synced.",
        bucket=settings.bucket_images,
        s3endpoint=endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        presign=False,
        use_blob_urls=False,
        synchronizable=False,
    )
    storages = project.ls.import_storage.s3.list(project=project.id)
    ours = [s for s in storages if s.bucket == settings.bucket_images]
    try:
        for storage in ours:
            if (storage.s3endpoint or "") == endpoint:
                return int(storage.id)
        if ours:
            project.ls.import_storage.s3.update(id=ours[0].id, **wanted)
            return int(ours[0].id)
        return int(project.ls.import_storage.s3.create(project=project.id, **wanted).id)
    except ApiError as exc:
        raise _refused(exc, endpoint) from exc


def webhook_url(settings: Settings) -> str:
    return f"{settings.api_url}{WEBHOOK_PATH}"


def webhook_secret(settings: Settings) -> str:
    secret = settings.webhook_secret.get_secret_value()
    if not secret:
        raise LabelStudioError(
            "VISIONLOOP_WEBHOOK_SECRET is empty: Label Studio's webhook needs its own secret "
            "(`visionloop up` generates one in the data dir's secrets.env)"
        )
    return secret


def ensure_webhook(settings: Settings, project: ReviewProject, url: str | None = None) -> int:
    """Id of the project's webhook to the API, created or brought up to date.

    A webhook whose headers differ (one still carrying the API token, or an old secret) is
    rewritten, so an upgrade or a rotated secret takes effect on the next call.
    """
    url = url or webhook_url(settings)
    headers = {"Authorization": f"Bearer {webhook_secret(settings)}"}
    wanted = dict(
        url=url,
        headers=headers,
        send_payload=True,
        send_for_all_actions=False,
        actions=list(WEBHOOK_ACTIONS),
        is_active=True,
    )
    try:
        for hook in project.ls.webhooks.list(project=str(project.id)):
            if hook.url != url:
                continue
            if (
                hook.headers != headers
                or not hook.is_active
                or set(hook.actions or []) != set(WEBHOOK_ACTIONS)
            ):
                project.ls.webhooks.update(id=hook.id, **wanted)
            return int(hook.id)
        return int(project.ls.webhooks.create(project=project.id, **wanted).id)
    except ApiError as exc:
        raise _refused(exc, url) from exc


WIRING_RECHECK_S = 60.0
"""How long ``wired_project`` trusts a wiring it ensured."""
_wired: dict[tuple[str, ...], tuple[ReviewProject, float]] = {}
_wired_lock = threading.Lock()


def _wiring_key(settings: Settings) -> tuple[str, ...]:
    return (
        settings.label_studio,
        settings.label_studio_project,
        *settings.class_names,
        settings.s3_url,
        settings.bucket_images,
        webhook_url(settings),
    )


def wired_project(settings: Settings) -> ReviewProject:
    """The review project with its image storage and webhook ensured, as this process last
    ensured them within ``WIRING_RECHECK_S``; the caller ``forget_wiring``s it when Label
    Studio then refuses a task (the project or its wiring went meanwhile)."""
    key = _wiring_key(settings)
    with _wired_lock:
        known = _wired.get(key)
    if known is not None and time.monotonic() - known[1] < WIRING_RECHECK_S:
        return known[0]
    project = review_project(settings)
    ensure_image_storage(settings, project)
    ensure_webhook(settings, project)
    with _wired_lock:
        _wired[key] = (project, time.monotonic())
    return project


def forget_wiring(settings: Settings) -> None:
    with _wired_lock:
        _wired.pop(_wiring_key(settings), None)
