"""Ingest throughput: the whole ingest flow against plain ultralytics ``predict``, and what
keeping each image's embedding costs.

    .venv/bin/python -m bench.ingest [--images 500] [--imgsz N] [--reuse]
    .venv/bin/python -m bench.ingest --embeddings [--images 200] [--rounds 2] [--reuse]

The flow predicts on the backend ``VISIONLOOP_INFERENCE_BACKEND=auto`` picks: the champion's
fastest export that passed its parity check (``serving.export``). It is compared with plain
ultralytics PyTorch predict (target: the flow at 2.0x or better) and with plain ultralytics
predict of that same export, ``YOLO(exported, task="detect").predict`` (target: 0.9x or
better: the flow around the export costs little); under ``VISIONLOOP_INFERENCE_PRECISION=auto``
both compute in what OpenVINO picks for the CPU. The parity record (per backend the precision
it was compared in, mAP50-95 on the held-out images, the difference, the embeddings' cosine)
is printed too. ``--imgsz``
defaults to the champion's training size, the export's fixed size; another size runs the flow
on PyTorch.

Both sides see the same synthetic JPEGs (640 px) and the same champion weights at the same
``imgsz``. Plain predict reads the files from a local folder; the flow reads them from the
``incoming`` bucket and does everything it does in production: hash, validate, decode,
features, store in the images bucket, predict, write the database, select and queue in
Label Studio. Prediction dominates on a CPU, so the flow should run at (nearly) the speed
of prediction alone: the target is a ratio of 0.9 or better.

Plain predict runs before and after the flow and the ratio uses the mean of the two, so a
change in background load during the run shows instead of skewing the result. The CPU time
per image of each side is printed too: unlike the rates, it hardly depends on what else the
machine is doing, and the run warns when the load average says other processes competed.

``--embeddings`` measures the embedding instead: the same flow, the same champion and the
same pixels with the feature hooks on and off (``ChampionPredictor.embed``), in the
order off, on, on, off per round so a drift in background load falls on both sides alike.
Each flow run gets its own copy of the images (a JPEG comment makes the bytes new, the
pixels stay), since a flow skips content it has seen. Selection is left out (budget 0), and
the champion's reference embeddings are computed before any timing: both are per cycle or
per champion, not per image. The predictor alone is timed the same way on the decoded
images. Target: embeddings add at most 10% to the ingest time.

Without ``--reuse`` it starts its own stack on free ports in a temporary data dir (about
two minutes) and trains a throw-away champion (one epoch); with ``--reuse`` it uses the
stack and champion the settings point at (``visionloop up``, ``visionloop bootstrap``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cli.stack import Stack, free_port
from visionloop.settings import Settings, get_settings, load_settings

if TYPE_CHECKING:
    from visionloop.registry import ModelRef


@contextmanager
def private_stack() -> Iterator[Settings]:
    """A whole local stack on free ports in a temporary data dir, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="visionloop-bench-") as data_dir:
        os.environ.update(
            {
                "VISIONLOOP_DATA_DIR": data_dir,
                **{
                    f"VISIONLOOP_{name}_PORT": str(free_port())
                    for name in ("S3", "PREFECT", "MLFLOW", "LABEL_STUDIO", "API")
                },
            }
        )
        stack = Stack(load_settings(), echo=print)
        try:
            print("starting a private stack in", data_dir)
            stack.up()
            yield use_stack(stack)
        finally:
            stack.down()


def use_stack(stack: Stack) -> Settings:
    """Point this process (Prefect, MLflow, the platform's settings) at ``stack``."""
    os.environ.update(stack.platform_env())
    get_settings.cache_clear()
    return get_settings()


def write_images(settings: Settings, count: int, folder: Path, prefix: str, seed: int) -> None:
    from visionloop.storage import ObjectStore
    from visionloop.synthetic import encode_jpeg, iter_samples

    store = ObjectStore(settings)
    folder.mkdir(parents=True, exist_ok=True)
    for index, sample in enumerate(iter_samples(count, seed=seed, size=640)):
        data = encode_jpeg(sample.image)
        (folder / f"img_{index:05d}.jpg").write_bytes(data)
        store.put_bytes(settings.bucket_incoming, f"{prefix}img_{index:05d}.jpg", data)


@dataclass(frozen=True)
class Measured:
    images: int
    seconds: float
    cpu_seconds: float
    """CPU time of this whole process (all its threads)."""

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.images

    def __str__(self) -> str:
        return f"{self.rate:6.2f} images/s, {self.cpu_ms:5.0f} CPU ms/image"


@contextmanager
def measure() -> Iterator[list[float]]:
    """Wall and CPU seconds of the block, appended to the yielded list on exit."""
    spent: list[float] = []
    wall, cpu = time.perf_counter(), time.process_time()
    yield spent
    spent += [time.perf_counter() - wall, time.process_time() - cpu]


def plain_predict(weights: Path, folder: Path, imgsz: int, batch: int = 1) -> Measured:
    """Ultralytics predicting the folder, model loading included (``weights``: a ``.pt``, an
    ``.onnx`` file or an OpenVINO model folder)."""
    from ultralytics import YOLO

    with measure() as spent:
        model = YOLO(str(weights), task="detect")
        results = model.predict(
            source=str(folder), imgsz=imgsz, batch=batch, stream=True, verbose=False
        )
        count = sum(1 for _ in results)
    return Measured(count, *spent)


def exported_champion(settings: Settings, champion: ModelRef) -> ModelRef:
    """The champion with its exports (exported here if the flow that made it did not)."""
    from serving.export import export_champion
    from visionloop.registry import export_record, get_version

    if not export_record(champion):
        print(f"exporting champion version {champion.version} (ONNX, OpenVINO, parity check)")
        export_champion(settings, champion)
        champion = get_version(settings, champion.version)
    return champion


def print_parity(settings: Settings, champion: ModelRef) -> None:
    from visionloop.registry import download_parity

    record = download_parity(settings, champion)
    print(
        f"parity on {record['images']} held-out images ({record['split']} split), "
        f"imgsz {record['imgsz']}: PyTorch mAP50-95 {record['torch_map50_95']}"
    )
    for backend, parity in record["backends"].items():
        print(
            f"  {backend:9s} in {parity.get('precision') or 'f32'}  "
            f"mAP50-95 {parity['map50_95']}  diff {parity['map_diff']}  "
            f"embedding cosine median {parity['embedding_cosine_median']} "
            f"min {parity['embedding_cosine_min']}  "
            f"{'verified' if parity['verified'] else 'REFUSED'}: {parity['reason']}"
        )


def exported_path(settings: Settings, champion: ModelRef, backend: str) -> Path:
    """What ``YOLO(...)`` loads for the backend: the ONNX file or the OpenVINO folder (copied
    to a name ultralytics recognises: it tells formats apart by the path)."""
    import shutil

    from serving.export import OPENVINO_DIR
    from visionloop.registry import download_export

    entry = download_export(settings, champion, backend, settings.data_dir / "bench-weights")
    if backend == "onnx":
        return entry
    folder = settings.data_dir / "bench-weights" / f"v{champion.version}" / OPENVINO_DIR
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(entry.parent, folder)
    return folder


def verdict(ratio: float, target: float) -> str:
    return f"(target >= {target:.2f}: {'meets' if ratio >= target else 'not met'})"


def ensure_champion(settings: Settings) -> ModelRef:
    """The champion the settings point at, a throw-away one (one epoch) trained if none."""
    from flows.bootstrap import bootstrap_flow
    from training.trainer import configure_ultralytics
    from visionloop.registry import CHAMPION, get_alias

    configure_ultralytics(settings.data_dir / ".ultralytics")
    import ultralytics  # noqa: F401 - imported before any timing: start-up is not throughput

    if get_alias(settings, CHAMPION) is None:
        print("training a throw-away champion (1 epoch)")
        bootstrap_flow(epochs=1, images=16)
    champion = get_alias(settings, CHAMPION)
    assert champion is not None
    return champion


def run(settings: Settings, images: int, imgsz: int | None) -> None:
    from flows.ingest import ingest_flow
    from ingestion.pipeline import PREDICT_CHUNK
    from serving.predictor import get_predictor
    from visionloop.registry import download_weights

    champion = exported_champion(settings, ensure_champion(settings))
    weights = download_weights(settings, champion, settings.data_dir / "bench-weights")
    predictor = get_predictor(settings)
    imgsz = imgsz or predictor.input_size()
    backend = predictor.backend
    print(f"the flow's predictor runs on {backend}: {predictor.backend_reason}")
    exported = exported_path(settings, champion, backend) if backend != "torch" else None

    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-{run_id}/"
    with tempfile.TemporaryDirectory(prefix="visionloop-bench-images-") as tmp:
        folder = Path(tmp)
        print(f"writing {images} synthetic 640 px JPEGs to {folder} and {prefix} in the bucket")
        # A fresh seed per run: the flow skips content it has seen before.
        write_images(settings, images, folder, prefix, seed=int(run_id, 16) % 100_000)

        load_before = os.getloadavg()[0]
        # Plain predict in the flow's batches (ultralytics' default is one image at a time).
        before = plain_predict(weights, folder, imgsz, PREDICT_CHUNK)
        print(f"plain ultralytics predict: {before}")
        plain_exported: list[Measured] = []
        if exported:
            plain_exported.append(plain_predict(exported, folder, imgsz, PREDICT_CHUNK))
            print(f"plain {backend} predict:    {plain_exported[-1]}")
        with measure() as spent:
            summary = ingest_flow(prefix=prefix, imgsz=imgsz)
        flow = Measured(summary["ingested"], *spent)
        print(f"ingest flow ({backend}):   {flow} ({summary['queued']} queued for review)")
        if exported:
            plain_exported.append(plain_predict(exported, folder, imgsz, PREDICT_CHUNK))
            print(f"plain {backend} predict:    {plain_exported[-1]}")
        after = plain_predict(weights, folder, imgsz, PREDICT_CHUNK)
        print(f"plain ultralytics predict: {after}")
        load_after = os.getloadavg()[0]

    baseline = (before.rate + after.rate) / 2
    cpus = os.cpu_count() or 1
    print()
    print(f"images {images}, imgsz {imgsz}, champion {champion.version}, {cpus} CPUs")
    print_parity(settings, champion)
    print(
        f"plain PyTorch predict {baseline:6.2f} images/s "
        f"(mean of {before.rate:.2f} and {after.rate:.2f})"
    )
    print(f"ingest flow ({backend}) {flow.rate:6.2f} images/s")
    print(
        f"flow / plain PyTorch predict      {flow.rate / baseline:6.2f}  "
        + verdict(flow.rate / baseline, 2.0)
    )
    if plain_exported:
        rate = sum(m.rate for m in plain_exported) / len(plain_exported)
        print(
            f"flow / plain {backend} predict  {flow.rate / rate:6.2f}  "
            f"{verdict(flow.rate / rate, 0.9)} (plain {backend} {rate:.2f} images/s, mean of "
            + " and ".join(f"{m.rate:.2f}" for m in plain_exported)
            + ")"
        )
    else:
        print(f"no verified export: the flow ran on PyTorch ({predictor.backend_reason})")
    print(
        f"CPU per image   {flow.cpu_ms:.0f} ms in the flow's process against "
        f"{(before.cpu_ms + after.cpu_ms) / 2:.0f} ms for plain predict"
    )
    if max(load_before, load_after) > cpus:
        print(
            f"warning: load average {max(load_before, load_after):.1f} on {cpus} CPUs: other "
            "processes competed for the CPUs, so the rates above are not a clean measurement"
        )


def with_comment(jpeg: bytes, comment: str) -> bytes:
    """The same JPEG (same pixels) with a comment segment after its start marker."""
    body = comment.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def embedding_cost(settings: Settings, images: int, imgsz: int, rounds: int) -> None:
    """The ingest flow and the predictor with and without the embedding hook."""
    from flows.ingest import ingest_flow
    from ingestion.pipeline import PREDICT_CHUNK
    from labeling.selection import SelectionPolicy
    from serving.predictor import get_predictor
    from visionloop.images import decode_image
    from visionloop.storage import ObjectStore
    from visionloop.synthetic import encode_jpeg, iter_samples

    champion = ensure_champion(settings)
    predictor = get_predictor(settings)
    store = ObjectStore(settings)
    run_id = uuid.uuid4().hex[:8]
    seed = int(run_id, 16) % 100_000
    samples = [s.image for s in iter_samples(images, seed=seed, size=640)]
    jpegs = [encode_jpeg(image) for image in samples]
    no_selection = SelectionPolicy(budget=0)

    def flow_run(label: str) -> Measured:
        prefix = f"bench-embed-{run_id}-{label}/"
        for index, data in enumerate(jpegs):
            copy = with_comment(data, f"{run_id}-{label}")
            store.put_bytes(settings.bucket_incoming, f"{prefix}img_{index:05d}.jpg", copy)
        with measure() as spent:
            summary = ingest_flow(prefix=prefix, imgsz=imgsz, selection=no_selection)
        assert summary["ingested"] == images, summary
        return Measured(images, *spent)

    print(f"warming up (model load, reference embeddings of version {champion.version})")
    predictor.embed = True
    flow_run("warm")

    order = [False, True, True, False] * rounds
    flows: dict[bool, list[Measured]] = {False: [], True: []}
    for index, embed in enumerate(order):
        predictor.embed = embed
        flows[embed].append(measured := flow_run(f"{index}-{int(embed)}"))
        print(f"ingest flow, embeddings {'on ' if embed else 'off'}: {measured}")

    decoded = [decode_image(data, max_side=imgsz).rgb for data in jpegs]
    predicts: dict[bool, list[Measured]] = {False: [], True: []}
    for embed in order:
        predictor.embed = embed
        with measure() as spent:
            for start in range(0, len(decoded), PREDICT_CHUNK):
                predictor.predict_batch(decoded[start : start + PREDICT_CHUNK], imgsz=imgsz)
        predicts[embed].append(Measured(images, *spent))
    predictor.embed = True

    def mean_seconds(runs: list[Measured]) -> float:
        return sum(r.seconds for r in runs) / len(runs)

    def mean_cpu(runs: list[Measured]) -> float:
        return sum(r.cpu_ms for r in runs) / len(runs)

    cpus = os.cpu_count() or 1
    print()
    print(
        f"images {images} x {len(order)} runs, imgsz {imgsz}, champion {champion.version}, "
        f"{cpus} CPUs"
    )
    for name, runs in (("ingest flow", flows), ("predictor  ", predicts)):
        off, on = mean_seconds(runs[False]), mean_seconds(runs[True])
        print(
            f"{name} without embeddings {1000 * off / images:6.1f} ms/image "
            f"({mean_cpu(runs[False]):.0f} CPU ms), with {1000 * on / images:6.1f} ms/image "
            f"({mean_cpu(runs[True]):.0f} CPU ms): ratio {on / off:.3f}"
        )
    ratio = mean_seconds(flows[True]) / mean_seconds(flows[False])
    print(f"embedding cost  {100 * (ratio - 1):+.1f}% ingest time  (target <= +10%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument(
        "--imgsz", type=int, default=None, help="default: the champion's (its export's) size"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="use the running stack of the settings"
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="measure what keeping embeddings costs (flow and predictor, hook on and off)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="off-on-on-off rounds")
    args = parser.parse_args()

    def bench(settings: Settings) -> None:
        if args.embeddings:
            embedding_cost(settings, args.images, args.imgsz, args.rounds)
        else:
            run(settings, args.images, args.imgsz)

    if args.reuse:
        bench(use_stack(Stack(load_settings())))
        return
    with private_stack() as settings:
        bench(settings)


if __name__ == "__main__":
    main()
