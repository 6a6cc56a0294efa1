"""An image embedding from the detector's own forward pass, and the mirrored pass.

The embedding is what the Detect head sees: each feature level entering it (for a YOLOv8n
three maps of 64, 128 and 256 channels) global-average-pooled, the levels concatenated and
the vector L2-normalised. It comes from the prediction's forward pass itself (a forward
pre-hook on the head), so it costs a few pooled sums, not a second model or a second pass.

Vectors are comparable only between predictions of one model version: another champion has
other features.

The hook goes on the model ultralytics actually runs. ``YOLO.predict`` does not run
``model.model`` but a fused copy of it that its predictor makes when it is first set up (and
again whenever a setup argument changes), so the hook is attached from the predictor's
``on_predict_start`` callback, which fires after that setup and before any forward, and is
removed when the call ends. Callers serialise calls on one model (``ChampionPredictor`` does,
under its model lock): a concurrent predict on the same model would feed this call's hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BLOB_DTYPE = np.float16
"""Stored vectors: half the bytes of float32, and ample precision for unit vectors."""


class FeaturesUnavailable(RuntimeError):
    """The model runs without a PyTorch Detect head to hook (an exported runtime)."""


def _detect_head(backend: Any) -> Any:
    """The last module of the network ``backend`` (ultralytics' ``AutoBackend``) runs."""
    layers = getattr(getattr(backend, "model", None), "model", None)
    if layers is None or not hasattr(layers, "__getitem__"):
        raise FeaturesUnavailable(
            f"the model runs as {getattr(backend, 'format', type(backend).__name__)!r}, not as "
            "a PyTorch network: its pooled features must be exported as a second output"
        )
    return layers[-1]


def pooled(levels: Sequence[Any]) -> np.ndarray:
    """Feature maps ``(b, c_i, h_i, w_i)`` -> ``(b, sum c_i)`` float32, each level's spatial mean.

    Not normalised: ``normalise`` does that once the rows of a call are together.
    """
    import torch

    with torch.no_grad():
        means = [level.float().mean(dim=(2, 3)) for level in levels]
        return torch.cat(means, dim=1).cpu().numpy().astype(np.float32, copy=False)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def predict_with_features(
    model: Any, images: Sequence[np.ndarray], **predict_kwargs: Any
) -> tuple[list[Any], np.ndarray]:
    """``model.predict(images, **predict_kwargs)`` once, and each image's embedding.

    ``model`` is an ultralytics ``YOLO`` (PyTorch weights); ``images`` are what its predict
    takes (BGR ``H x W x 3`` arrays: one batch, one forward). Returns the results and an
    ``(n, d)`` float32 array of L2-normalised embeddings in the order of ``images``.
    ``FeaturesUnavailable`` if the model has no PyTorch head to hook.
    """
    images = list(images)
    captured: list[np.ndarray] = []
    handles: list[Any] = []

    def capture(_module: Any, args: tuple[Any, ...]) -> None:
        captured.append(pooled(args[0]))

    def attach(predictor: Any) -> None:
        handles.append(_detect_head(predictor.model).register_forward_pre_hook(capture))

    starts = model.callbacks["on_predict_start"]
    starts.append(attach)
    try:
        results = model.predict(images, **predict_kwargs)
    finally:
        starts.remove(attach)
        for handle in handles:
            handle.remove()
    rows = np.concatenate(captured) if captured else np.zeros((0, 0), np.float32)
    if len(rows) < len(images):
        raise FeaturesUnavailable(
            f"the Detect head saw {len(rows)} images of {len(images)}: predict did not run the "
            "hooked network"
        )
    # A model's first predict on a GPU runs a warm-up forward on the same batch first: the
    # call's own images are the last rows.
    return list(results), normalise(rows[len(rows) - len(images) :])


def mirror(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The images flipped left to right (contiguous: ultralytics stacks them)."""
    return [np.ascontiguousarray(image[:, ::-1]) for image in images]


def unmirror_boxes(xyxyn: np.ndarray) -> np.ndarray:
    """Normalised ``x1, y1, x2, y2`` boxes found on a mirrored image, in the original frame."""
    boxes = np.array(xyxyn, dtype=float, copy=True).reshape(-1, 4)
    boxes[:, 0], boxes[:, 2] = 1.0 - boxes[:, 2], 1.0 - boxes[:, 0]
    return boxes


def to_blob(vector: np.ndarray) -> bytes:
    """A vector as stored (``Prediction.embedding``): float16 bytes."""
    return np.asarray(vector, dtype=BLOB_DTYPE).reshape(-1).tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    """A stored vector back as float32."""
    return np.frombuffer(blob, dtype=BLOB_DTYPE).astype(np.float32)
