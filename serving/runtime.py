"""Running an exported champion (ONNX Runtime or OpenVINO) the way ultralytics runs PyTorch.

The exported graph (``serving.export``) takes a batch of letterboxed images at the champion's
fixed square ``imgsz`` and has two outputs: the Detect head's decoded output (what
ultralytics' NMS reads) and the early block's pooled statistics (``serving.embedding``).
Around it this module does what ultralytics' predictor does around a PyTorch network, with
ultralytics' own pieces: ``LetterBox`` (square, no minimal-rectangle shortcut: the graph's
size is fixed), ``non_max_suppression`` with its predictor's defaults and ``scale_boxes``. So
both backends yield one ``Detections`` per image and one embedding, and ``ChampionPredictor``
shapes them alike.

A runtime is not thread-safe (its inference requests are reused): its caller serialises
calls, as ``ChampionPredictor`` does under its model lock. Within a call a batch may run in
parts side by side (``VISIONLOOP_INFERENCE_MODE``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.embedding import normalise

ONNX = "onnx"
OPENVINO = "openvino"
TORCH = "torch"
EXPORTED_BACKENDS = (OPENVINO, ONNX)
"""Exported backends, fastest first on a CPU (measured on 2 cores: OpenVINO 2.9x, ONNX
Runtime 2.0x PyTorch on yolov8n at 640 px)."""
INPUT_NAME = "images"
DETECTIONS_OUTPUT = "detections"
EMBEDDING_OUTPUT = "embedding"
NMS_IOU = 0.7
"""ultralytics' predict default, so both backends suppress alike."""
MAX_DET = 300
F32 = "f32"
THROUGHPUT = "throughput"
LATENCY = "latency"
"""How a runtime uses the cores (``VISIONLOOP_INFERENCE_MODE``). ``latency``: one request
with every core, each layer split across them. ``throughput``: the cores in streams, a
batch split across them, each part on its own stream. Under ``latency`` every layer waits for
its slowest core, so whatever else runs (decoding, uploads, the object store's server) stalls
the whole forward pass: on two cores a second busy thread took a 640 px yolov8n on OpenVINO
from 21 to 37 ms an image under ``latency``, from 18 to 28 ms in two streams. A lone image
still gets every core."""


@dataclass(frozen=True)
class Detections:
    """One image's boxes after NMS, most confident first."""

    xyxyn: np.ndarray
    """``(n, 4)`` float: x1, y1, x2, y2 normalised to the original image."""
    conf: np.ndarray
    """``(n,)`` float."""
    cls: np.ndarray
    """``(n,)`` int."""

    @classmethod
    def from_result(cls, result: Any) -> Detections:
        """An ultralytics ``Results`` (the PyTorch backend's)."""
        boxes = result.boxes
        if boxes is None or not len(boxes):
            return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))
        return cls(
            boxes.xyxyn.cpu().numpy().astype(float),
            boxes.conf.cpu().numpy().astype(float),
            boxes.cls.cpu().numpy().astype(int),
        )


def cpu_threads() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ExportedRuntime:
    """An exported model loaded in ONNX Runtime or OpenVINO, predicting like ``YOLO.predict``."""

    def __init__(
        self,
        backend: str,
        path: Path,
        *,
        imgsz: int,
        names: dict[int, str],
        precision: str = F32,
        mode: str = THROUGHPUT,
        threads: int | None = None,
    ) -> None:
        """``precision``: ``f32``, or ``auto`` for what the runtime picks on this CPU;
        ``self.precision`` is what it computes in (``f32``, ``bf16``...). ``mode``:
        ``throughput`` or ``latency``; ``self.streams`` is how many parts a batch runs in."""
        self.backend = backend
        self.imgsz = int(imgsz)
        self.names = dict(names)
        self.path = path
        threads = threads or cpu_threads()
        if backend == ONNX:
            # ONNX Runtime's CPU provider computes an f32 graph in f32 whatever the CPU.
            self._infer, self.streams = _onnx_session(path, threads, mode)
            self.precision = F32
        elif backend == OPENVINO:
            self._infer, self.streams, self.precision = _openvino_requests(
                path, threads, precision, mode
            )
        else:
            raise ValueError(f"unknown exported backend {backend!r}; one of {EXPORTED_BACKENDS}")

    def preprocess(self, bgr: Sequence[np.ndarray]) -> np.ndarray:
        """BGR ``H x W x 3`` uint8 images -> the graph's ``(b, 3, s, s)`` float32 RGB in 0..1."""
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, stride=32)
        batch = np.stack([letterbox(image=image) for image in bgr])
        # BGR -> RGB and BHWC -> BCHW as views, converted and scaled in one pass into the
        # graph's layout: the same floats as a contiguous copy divided by 255, five times faster.
        out = np.empty((len(batch), 3, self.imgsz, self.imgsz), dtype=np.float32)
        np.divide(batch[..., ::-1].transpose(0, 3, 1, 2), np.float32(255), out=out)
        return out

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's two outputs: raw detections ``(b, 4 + nc, anchors)`` and pooled
        statistics ``(b, d)`` (not yet normalised)."""
        return self._infer(batch)

    def predict(
        self, bgr: Sequence[np.ndarray], *, conf: float
    ) -> tuple[list[Detections], np.ndarray]:
        """Each image's detections at or above ``conf`` and its L2-normalised embedding."""
        import torch
        from ultralytics.utils import ops
        from ultralytics.utils.nms import non_max_suppression

        images = list(bgr)
        raw, pooled = self.infer(self.preprocess(images))
        kept = non_max_suppression(
            torch.from_numpy(raw), conf, NMS_IOU, None, False, max_det=MAX_DET, nc=0
        )
        detections = []
        for image, found in zip(images, kept):
            height, width = image.shape[:2]
            xyxy = ops.scale_boxes((self.imgsz, self.imgsz), found[:, :4].clone(), image.shape)
            scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
            detections.append(
                Detections(
                    (xyxy / scale).numpy().astype(float),
                    found[:, 4].numpy().astype(float),
                    found[:, 5].numpy().astype(int),
                )
            )
        return detections, normalise(pooled)


Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
RunParts = Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]


def _parts(batch: np.ndarray, streams: int) -> list[np.ndarray]:
    """``batch`` cut into at most ``streams`` parts of nearly equal size, none empty."""
    return [part for part in np.array_split(batch, min(streams, len(batch))) if len(part)]


def _split(streams: int, run_parts: RunParts, lone: Infer) -> Infer:
    """An infer call that runs a batch in up to ``streams`` parts side by side
    (``run_parts``), and an image alone on ``lone``, which gives it every core."""

    def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) < 2 or streams < 2:
            return lone(batch)
        raw, pooled = zip(*run_parts(_parts(batch, streams)))
        return np.concatenate(raw), np.concatenate(pooled)

    return infer


def _onnx_session(path: Path, threads: int, mode: str) -> tuple[Infer, int]:
    """The session's infer call and how many parts of a batch it runs at once: under
    ``throughput`` one per core, each on one thread of a session of its own (``run`` lets go
    of the GIL), under ``latency`` one on every core."""
    import onnxruntime as ort

    def session(intra_op_threads: int) -> Infer:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1  # one graph at a time: parallelism is inside the ops
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        loaded = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            raw, pooled = loaded.run([DETECTIONS_OUTPUT, EMBEDDING_OUTPUT], {INPUT_NAME: batch})
            return raw, pooled

        return run

    lone = session(threads)
    streams = threads if mode == THROUGHPUT else 1
    if streams < 2:
        return lone, 1
    single = session(1)
    pool = ThreadPoolExecutor(streams, thread_name_prefix="onnx")
    return _split(streams, lambda parts: list(pool.map(single, parts)), lone), streams


def _openvino_requests(
    path: Path, threads: int, precision: str, mode: str
) -> tuple[Infer, int, str]:
    """The compiled model's infer call, how many parts of a batch it runs at once (the
    requests its streams want) and the precision it computes in: OpenVINO picks bf16 on
    CPUs with bfloat16 units (about twice as fast) unless told f32."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))

    def compiled(hint: str) -> Any:
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        if precision == F32:
            config["INFERENCE_PRECISION_HINT"] = F32
        return core.compile_model(model, "CPU", config)

    def outputs(request: Any) -> tuple[np.ndarray, np.ndarray]:
        # Copies: the request's buffers are overwritten by the next call.
        return (
            np.array(request.get_tensor(DETECTIONS_OUTPUT).data),
            np.array(request.get_tensor(EMBEDDING_OUTPUT).data),
        )

    latency = compiled("LATENCY")
    lone_request = latency.create_infer_request()

    def lone(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lone_request.infer({INPUT_NAME: batch})
        return outputs(lone_request)

    precision_used = latency.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if mode != THROUGHPUT:
        return lone, 1, precision_used
    streamed = compiled("THROUGHPUT")
    streams = max(1, int(streamed.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    requests = [streamed.create_infer_request() for _ in range(streams)]

    def run_parts(parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        # Every part starts on a stream of its own before any is waited for.
        for request, part in zip(requests, parts):
            request.start_async({INPUT_NAME: part})
        for request, _ in zip(requests, parts):
            request.wait()
        return [outputs(request) for request, _ in zip(requests, parts)]

    return _split(streams, run_parts, lone), streams, precision_used
