"""`visionloop bootstrap` registers a first model whose `champion` alias resolves in MLflow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from cli.stack import Stack
from visionloop.models import utcnow
from visionloop.registry import CHAMPION, client, download_weights, get_alias
from visionloop.settings import Settings, get_settings
from visionloop.synthetic import generate_sample

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture
def settings(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A registered model of its own: other tests of the session bootstrap champions too."""
    monkeypatch.setenv("VISIONLOOP_MODEL_NAME", f"bootstrap-test-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_bootstrap_registers_a_champion(settings: Settings, tmp_path) -> None:
    from flows.bootstrap import bootstrap_flow
    from visionloop.events import recent

    started = utcnow()
    assert get_alias(settings, CHAMPION) is None
    result = bootstrap_flow(epochs=2, images=16)
    assert result["created"] is True

    champion = get_alias(settings, CHAMPION)
    assert champion is not None and champion.version == result["version"]
    run = client(settings).get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    # VISIONLOOP_DEVICE (auto here) as resolved on this machine: cuda:0 or cpu.
    from training.trainer import resolve_device

    assert run.data.params["device"] == resolve_device("auto")
    assert run.data.tags["visionloop.trigger"] == "bootstrap"
    history = client(settings).get_metric_history(champion.run_id, "mAP50")
    assert [m.step for m in history] == [1, 2]  # one point per epoch

    # The registered weights load and predict with ultralytics.
    from ultralytics import YOLO

    weights = download_weights(settings, champion, tmp_path / "models")
    model = YOLO(str(weights))
    assert list(model.names.values()) == settings.class_names
    prediction = model.predict(
        generate_sample(0, seed=99, size=settings.image_size).image, verbose=False
    )
    assert prediction[0].boxes is not None

    # Progress went out as events, one per epoch.
    epochs = [e.payload["epoch"] for e in recent(since=started, kind_prefix="training.epoch")]
    assert sorted(epochs) == [1, 2]

    # A second bootstrap keeps the champion it has.
    again = bootstrap_flow(epochs=2, images=16)
    assert again == {"created": False, "version": champion.version, "run_id": champion.run_id}
    assert np.array_equal([champion.version], [get_alias(settings, CHAMPION).version])
