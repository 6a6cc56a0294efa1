"""A queued image's preview through the API: the stored image, small, with the champion's boxes
in the Label Studio class colours, behind the read token."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from queue_rows import queued_item

from api.main import create_app
from cli.stack import Stack
from labeling.label_config import class_colours
from labeling.preview import PREVIEW_SIDE
from visionloop.settings import get_settings

pytestmark = [pytest.mark.stack]


@pytest.fixture
def queued(stack: Stack) -> Iterator[int]:
    with queued_item() as item_id:
        yield item_id


def test_the_preview_shows_the_champions_boxes_behind_the_read_token(queued: int) -> None:
    settings = get_settings()
    # An empty read token means the API token reads too.
    token = settings.api_read_token.get_secret_value() or settings.api_token.get_secret_value()
    read = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        url = f"/api/labeling/queue/{queued}/preview"
        assert client.get(url).status_code == 401
        response = client.get(url, headers=read)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert client.get("/api/labeling/queue/987654321/preview", headers=read).status_code == 404

    picture = np.asarray(PILImage.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    assert picture.shape == (PREVIEW_SIDE * 3 // 4, PREVIEW_SIDE, 3)
    colour = np.array([int(class_colours(1)[0][i : i + 2], 16) for i in (1, 3, 5)])
    # The box's left edge at a quarter of the width, halfway down: the class colour (JPEG
    # blurs a little); the middle of the box stays the image's grey.
    edge = picture[120, 80:82].mean(axis=0)
    assert np.abs(edge - colour).max() < 60, edge
    assert np.abs(picture[120, 160] - 128).max() < 12
