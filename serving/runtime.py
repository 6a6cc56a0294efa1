"""Running an exported champion (ONNX Runtime or OpenVINO) the way ultralytics runs PyTorch.

The exported graph (``serving.export``) takes a batch of letterboxed images at the champion's
fixed square ``imgsz`` and has two outputs: the Detect head's decoded output (what
ultralytics' NMS reads) and the early block's pooled statistics (``serving.embedding``).
Around it this module does what ultralytics' predictor does around a PyTorch network, with
ultralytics' own pieces: ``LetterBox`` (square, no minimal-rectangle shortcut: the graph's
size is fixed), ``non_max_suppression`` with its predictor's defaults and ``scale_boxes``. So
both backends yield one ``Detections`` per image and one embedding, and ``ChampionPredictor``
shapes them alike.

A runtime is not thread-safe (one inference request, reused): its caller serialises calls,
as ``ChampionPredictor`` does under its model lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.embedding import normalise

ONNX = "onnx"
OPENVINO = "openvino"
TORCH = "torch"
EXPORTED_BACKENDS = (OPENVINO, ONNX)
"""Exported backends, fastest first on a CPU (measured: OpenVINO 2.9x, ONNX Runtime 2.0x
PyTorch on yolov8n, see ENVIRONMENT.md)."""
INPUT_NAME = "images"
DETECTIONS_OUTPUT = "detections"
EMBEDDING_OUTPUT = "embedding"
NMS_IOU = 0.7
"""ultralytics' predict default, so both backends suppress alike."""
MAX_DET = 300
OPENVINO_HINT = "LATENCY"
F32 = "f32"
"""One synchronous request per batch: the LATENCY hint gives that request every core, while
THROUGHPUT splits the cores into streams that only parallel requests would fill (the
predictor runs one batch at a time). Not yet measured against THROUGHPUT on this machine."""


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
        threads: int | None = None,
    ) -> None:
        """``precision``: ``f32``, or ``auto`` for what the runtime picks on this CPU;
        ``self.precision`` is what it computes in (``f32``, ``bf16``...)."""
        self.backend = backend
        self.imgsz = int(imgsz)
        self.names = dict(names)
        self.path = path
        threads = threads or cpu_threads()
        if backend == ONNX:
            # ONNX Runtime's CPU provider computes an f32 graph in f32 whatever the CPU.
            self._infer, self.precision = _onnx_session(path, threads), F32
        elif backend == OPENVINO:
            self._infer, self.precision = _openvino_request(path, threads, precision)
        else:
            raise ValueError(f"unknown exported backend {backend!r}; one of {EXPORTED_BACKENDS}")

    def preprocess(self, bgr: Sequence[np.ndarray]) -> np.ndarray:
        """BGR ``H x W x 3`` uint8 images -> the graph's ``(b, 3, s, s)`` float32 RGB in 0..1."""
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, stride=32)
        batch = np.stack([letterbox(image=image) for image in bgr])
        batch = batch[..., ::-1].transpose(0, 3, 1, 2)  # BGR -> RGB, BHWC -> BCHW
        return np.ascontiguousarray(batch, dtype=np.float32) / 255.0

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


def _onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one graph at a time: parallelism is inside the ops
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw, pooled = session.run([DETECTIONS_OUTPUT, EMBEDDING_OUTPUT], {INPUT_NAME: batch})
        return raw, pooled

    return infer


def _openvino_request(path: Path, threads: int, precision: str) -> tuple[Any, str]:
    """The compiled model's infer call and the precision it computes in: OpenVINO picks bf16
    on CPUs with bfloat16 units (about twice as fast) unless told f32."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": OPENVINO_HINT, "INFERENCE_NUM_THREADS": threads}
    if precision == F32:
        config["INFERENCE_PRECISION_HINT"] = F32
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    detections, embedding = compiled.output(DETECTIONS_OUTPUT), compiled.output(EMBEDDING_OUTPUT)

    def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = request.infer({INPUT_NAME: batch})
        # Copies: the request's buffers are overwritten by the next call.
        return np.array(outputs[detections]), np.array(outputs[embedding])

    return infer, compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
