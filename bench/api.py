"""API latency under concurrent load: the retraining conditions and serving, against a trivial
endpoint of the same API process in the same run.

    .venv/bin/python -m bench.api [--requests 300] [--concurrency 8] [--reuse]

The load goes to the API process the stack runs (uvicorn, one worker), over loopback only,
with a fixed number of requests per endpoint and ``--concurrency`` requests in flight:

* ``GET /api/health``: trivial, async, touches nothing; the yardstick;
* ``GET /api/retraining/conditions``: the database and MLflow (the champion's age);
* ``POST /api/predict``: a distinct 640 px JPEG per request, so each one does all a production
  prediction does: decode, predict with the champion, store the image, measure its features
  and log the prediction.

The trivial endpoint is measured before and after the two others and its samples pooled, so
a change in background load during the run shows up in the ratios instead of hiding in them.
p50 and p99 are printed with their ratio to the trivial endpoint's.

``/api/predict``'s throughput (images per second with ``--concurrency`` clients) is compared
with the model alone in this process: ``predict_batch`` of the same champion over the same
images, decoded as the API decodes them, in batches of 16 (what the API's batcher may form at
most, ``VISIONLOOP_BATCH_MAX``). The targets: throughput at least 0.8x the plain batch
predict, ``/api/predict`` p99 at most 10x and ``/api/retraining/conditions`` p99 at most 3x the
trivial endpoint's p99.

Without ``--reuse`` it starts its own stack on free ports in a temporary data dir (about two
minutes) and trains a throw-away champion (one epoch); with ``--reuse`` it uses the stack the
settings point at, and its predictions are logged there like any client's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from api.telemetry import percentile
from bench.ingest import private_stack, use_stack
from cli.stack import Stack
from visionloop.settings import Settings, load_settings

TIMEOUT_S = 120.0
"""Per request: a request slower than this counts as an error, so the run always ends."""
BASELINE_BATCH = 16
THROUGHPUT_TARGET = 0.8
"""/api/predict images per second over the plain batch predict's, at least."""
PREDICT_P99_TARGET = 10.0
"""/api/predict p99 over the trivial endpoint's p99, at most."""
CONDITIONS_P99_TARGET = 3.0
"""/api/retraining/conditions p99 over the trivial endpoint's p99, at most."""


@dataclass
class Result:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    """Wall time of the whole load, first request sent to last answer."""

    def p(self, q: float) -> float:
        value = percentile(self.latencies_ms, q)
        assert value is not None, f"{self.name}: no successful request"
        return value


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def load(
    name: str, client: httpx.AsyncClient, request: Request, count: int, concurrency: int
) -> Result:
    """``count`` requests, ``concurrency`` at a time; request ``i`` is ``request(client, i)``."""
    result = Result(name)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                response = await request(client, index)
            except httpx.HTTPError as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.is_success:
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                result.errors.append(f"{response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result


def _images(count: int, seed: int) -> list[bytes]:
    from visionloop.synthetic import encode_jpeg, iter_samples

    return [encode_jpeg(sample.image) for sample in iter_samples(count, seed=seed, size=640)]


def plain_batch_rate(settings: Settings, images: list[bytes]) -> float:
    """Images per second of the champion alone in this process, in batches of 16: what the
    API's batching is measured against (its decoding is not timed, the API's is)."""
    from serving.predictor import ChampionPredictor
    from visionloop.images import DecodeLimits, decode_image

    predictor = ChampionPredictor(settings)
    limits = DecodeLimits.from_settings(settings)
    side = predictor.input_size()
    decoded = [decode_image(data, max_side=side, limits=limits).rgb for data in images]
    predictor.predict_batch(decoded[:BASELINE_BATCH])  # warm-up: the first batch pays setup
    started = time.perf_counter()
    for at in range(0, len(decoded), BASELINE_BATCH):
        predictor.predict_batch(decoded[at : at + BASELINE_BATCH])
    return len(decoded) / (time.perf_counter() - started)


async def measure(
    settings: Settings, requests: int, concurrency: int
) -> tuple[list[Result], float]:
    """The three endpoints' results and the plain batch predict's images per second."""
    token = settings.api_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}"}
    run = uuid.uuid4().hex[:8]
    predictions = max(
        requests // 2, 20
    )  # predict is CPU bound: fewer requests, the same percentiles
    # A fresh seed per run: an image the platform has seen is not stored or measured again.
    images = _images(predictions + concurrency, seed=int(run, 16) % 100_000)
    warmups = images[predictions:]
    print(f"plain batch predict in this process: {predictions} images, batches of 16")
    plain_rate = plain_batch_rate(settings, images[:predictions])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def trivial(client: httpx.AsyncClient, _i: int) -> Awaitable[httpx.Response]:
        return client.get("/api/health")

    def conditions(client: httpx.AsyncClient, _i: int) -> Awaitable[httpx.Response]:
        return client.get("/api/retraining/conditions")

    def predict(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        files = {"file": (f"bench-{run}-{i}.jpg", images[i], "image/jpeg")}
        return client.post("/api/predict", files=files, headers=headers)

    def warm_predict(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        files = {"file": (f"bench-{run}-warmup-{i}.jpg", warmups[i], "image/jpeg")}
        return client.post("/api/predict", files=files, headers=headers)

    async with httpx.AsyncClient(
        base_url=settings.api_url, timeout=TIMEOUT_S, limits=limits
    ) as client:
        print("warming up (the first prediction loads the champion)")
        for name, request, count in (
            ("trivial", trivial, 20),
            ("conditions", conditions, 10),
            ("predict", warm_predict, concurrency),
        ):
            warm = await load(name, client, request, count, 1)
            if warm.errors:
                raise SystemExit(f"warm-up of {name} failed: {warm.errors[0]}")

        print(
            f"measuring: {requests} trivial, {requests} conditions, {predictions} predict, "
            f"{requests} trivial again; {concurrency} in flight"
        )
        before = await load("trivial", client, trivial, requests, concurrency)
        conditions_result = await load("conditions", client, conditions, requests, concurrency)
        predict_result = await load("predict", client, predict, predictions, concurrency)
        after = await load("trivial", client, trivial, requests, concurrency)
    pooled = Result(
        "trivial", before.latencies_ms + after.latencies_ms, before.errors + after.errors
    )
    return [pooled, conditions_result, predict_result], plain_rate


def _verdict(ok: bool) -> str:
    return "meets" if ok else "not met"


def report(results: list[Result], concurrency: int, plain_rate: float) -> None:
    trivial = results[0]
    base50, base99 = trivial.p(50), trivial.p(99)
    print()
    print(f"{os.cpu_count()} CPUs, {concurrency} requests in flight, one uvicorn worker, loopback")
    print(
        f"{'endpoint':<34}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'p50 ratio':>11}{'p99 ratio':>11}{'errors':>8}"
    )
    paths = {
        "trivial": "GET /api/health",
        "conditions": "GET /api/retraining/conditions",
        "predict": "POST /api/predict",
    }
    for result in results:
        print(
            f"{paths[result.name]:<34}{len(result.latencies_ms):>6}{result.p(50):>10.1f}{result.p(99):>10.1f}"
            f"{result.p(50) / base50:>11.1f}{result.p(99) / base99:>11.1f}{len(result.errors):>8}"
        )
    failed = [(r.name, r.errors[0]) for r in results if r.errors]
    if failed:
        raise SystemExit(f"requests failed: {failed}")

    conditions, predict = results[1], results[2]
    api_rate = len(predict.latencies_ms) / predict.elapsed_s
    throughput = api_rate / plain_rate
    predict_p99 = predict.p(99) / base99
    conditions_p99 = conditions.p(99) / base99
    print()
    print(
        f"POST /api/predict throughput, {concurrency} clients: {api_rate:.1f} images/s vs "
        f"{plain_rate:.1f} images/s plain predict_batch (batches of {BASELINE_BATCH}) in "
        f"process: {throughput:.2f}x (target >= {THROUGHPUT_TARGET:g}x): "
        f"{_verdict(throughput >= THROUGHPUT_TARGET)}"
    )
    print(
        f"POST /api/predict p99 {predict.p(99):.1f} ms vs trivial p99 {base99:.1f} ms: "
        f"{predict_p99:.1f}x (target <= {PREDICT_P99_TARGET:g}x): "
        f"{_verdict(predict_p99 <= PREDICT_P99_TARGET)}"
    )
    print(
        f"GET /api/retraining/conditions p99 {conditions.p(99):.1f} ms vs trivial p99 "
        f"{base99:.1f} ms: {conditions_p99:.1f}x (target <= {CONDITIONS_P99_TARGET:g}x): "
        f"{_verdict(conditions_p99 <= CONDITIONS_P99_TARGET)}"
    )


def run(settings: Settings, requests: int, concurrency: int) -> None:
    from flows.bootstrap import bootstrap_flow
    from visionloop.registry import CHAMPION, get_alias

    if get_alias(settings, CHAMPION) is None:
        print("training a throw-away champion (1 epoch)")
        bootstrap_flow(epochs=1, images=8)
    results, plain_rate = asyncio.run(measure(settings, requests, concurrency))
    report(results, concurrency, plain_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per endpoint (predict: half)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--reuse", action="store_true", help="use the running stack of the settings"
    )
    args = parser.parse_args()
    if args.reuse:
        run(use_stack(Stack(load_settings())), args.requests, args.concurrency)
        return
    with private_stack() as settings:
        run(settings, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
