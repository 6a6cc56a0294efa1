"""Queue previews: a queued image with the champion's boxes, for the dashboard's gallery."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import ReadToken, SessionDep, SettingsDep, StoreDep
from api.errors import AUTH, content, responses
from api.schemas import ItemId
from labeling.preview import queue_preview

router = APIRouter(prefix="/api/labeling/queue", tags=["labeling"])


@router.get(
    "/{item_id}/preview",
    response_class=Response,
    dependencies=[ReadToken],
    responses={
        **content("image/jpeg", "The image, at most 320 px, with the champion's boxes."),
        **AUTH,
        **responses(404, 422),
    },
)
def preview(
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    item_id: ItemId,
) -> Response:
    """What the reviewer will see first: the queued image with the boxes the champion
    pre-annotated (data-bearing: it is the image itself)."""
    jpeg = queue_preview(session, settings, store, item_id)
    return Response(
        jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"}
    )
