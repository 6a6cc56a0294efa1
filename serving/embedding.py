"""An image embedding from the detector's own forward pass, and the mirrored pass.

The embedding is how the image looks to the detector's early backbone: the spatial mean and
standard deviation of each channel of one early block (``EARLY_LAYER``, stride 4: 32
channels, 64 numbers on a YOLOv8n), L2-normalised. Those statistics carry exposure,
contrast, colour cast, noise and texture, and they barely move when the detector is
fine-tuned. Measured on the benchmark's synthetic scenes (``bench.active_learning``, cosine
distances, medians, the clean-trained initial model): frames of one scene lie 0.0008 apart
(0.008 at the 95th percentile), the nearest frame of another scene 0.015; clean training
frames lie 0.02 from their nearest neighbour, while dark frames lie 0.21, washed-out ones
0.61 and colour-cast ones 0.75 from the nearest clean training frame. That is what
near-duplicate collapse, the spread of a batch and novelty under drift need.

The Detect head's pooled inputs were tried first and dropped: deep features are trained to
ignore lighting and contrast (a dark frame of a known scene looked familiar), unrelated
frames of one model lay 0.003 - 0.03 apart, and after a fine-tuning frames of one scene
could lie farther apart than different scenes.

It comes from the prediction's forward pass itself (a forward hook on the early block), so it
costs a few pooled sums, not a second model or a second pass. Vectors are comparable only
between predictions of one model version: another champion has other features.

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
EARLY_LAYER = 2
"""The backbone module whose output is pooled: the first block after two stride-2
convolutions (a C2f on YOLOv8), early enough to keep exposure and contrast."""


class FeaturesUnavailable(RuntimeError):
    """The model runs without a PyTorch network to hook (an exported runtime)."""


def _layers(backend: Any) -> Any:
    """The modules of the network ``backend`` (ultralytics' ``AutoBackend``) runs."""
    layers = getattr(getattr(backend, "model", None), "model", None)
    if layers is None or not hasattr(layers, "__getitem__") or len(layers) <= EARLY_LAYER + 1:
        raise FeaturesUnavailable(
            f"the model runs as {getattr(backend, 'format', type(backend).__name__)!r}, not as "
            "a PyTorch network: its pooled features must be exported as a second output"
        )
    return layers


def pooled_statistics(level: Any) -> Any:
    """A feature map ``(b, c, h, w)`` -> ``(b, 2c)`` tensor: each channel's spatial mean, then
    its spatial standard deviation (unbiased).

    The one definition of the embedding's numbers: the hook below runs it on PyTorch's
    forward, and ``serving.export`` traces it into the exported graph as its second output, so
    both backends pool alike. Written with plain means (no ``std_mean``) so that every ONNX
    opset and OpenVINO convert it.
    """
    import torch

    flat = level.float().flatten(2)
    mean = flat.mean(dim=2)
    centred = flat - mean.unsqueeze(2)
    # Bessel's correction, as ``torch.std``; a map of one pixel has no spread to estimate.
    std = ((centred * centred).sum(dim=2) / (flat.shape[2] - 1)).sqrt()
    return torch.cat([mean, std], dim=1)


def appearance(level: Any) -> np.ndarray:
    """A feature map ``(b, c, h, w)`` -> ``(b, 2c)`` float32 numpy (``pooled_statistics``)."""
    import torch

    with torch.no_grad():
        pooled = pooled_statistics(level)
        return pooled.cpu().numpy().astype(np.float32, copy=False)


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
    ``FeaturesUnavailable`` if the model has no PyTorch network to hook.
    """
    images = list(images)
    captured: list[np.ndarray] = []
    handles: list[Any] = []

    def capture(_module: Any, _args: tuple[Any, ...], output: Any) -> None:
        captured.append(appearance(output))

    def attach(predictor: Any) -> None:
        handles.append(_layers(predictor.model)[EARLY_LAYER].register_forward_hook(capture))

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
            f"the hooked network saw {len(rows)} images of {len(images)}: predict did not run it"
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
