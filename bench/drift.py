"""Drift costs: feature extraction against plain decoding, and Evidently on 100,000 rows.

    .venv/bin/python -m bench.drift [--images 300] [--size 1280] [--rows 100000]

1. Feature extraction (``monitoring.features.extract_features``: validate, decode at the
   analysis scale, every feature) against a plain full decode of the same JPEGs with PIL,
   in the same run, as images per second and their ratio. Target: 1.0 or better: decoding at
   a reduced DCT scale saves more than the features cost.
2. The drift report (``monitoring.drift.compute_drift``: Evidently per-feature tests plus the
   score) on a 100,000-row reference against a 100,000-row current window, in seconds.

No servers needed. Each timing is the best of ``--repeat`` runs, so background load on a shared
machine inflates neither side.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pandas as pd
from PIL import Image


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def feature_throughput(images: int, size: int, repeat: int) -> tuple[float, float]:
    from monitoring.features import extract_features
    from visionloop.synthetic import encode_jpeg, iter_samples

    blobs = [encode_jpeg(s.image) for s in iter_samples(images, seed=7, size=size)]

    def plain_decode() -> None:
        for blob in blobs:
            np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))

    def features() -> None:
        for blob in blobs:
            extract_features(blob)

    decode_s = _best(plain_decode, repeat)
    features_s = _best(features, repeat)
    return images / decode_s, images / features_s


def report_seconds(rows: int, repeat: int) -> float:
    from monitoring.drift import compute_drift
    from monitoring.features import FEATURE_NAMES

    rng = np.random.default_rng(0)
    columns = [name for name in FEATURE_NAMES if name not in ("width", "height")]
    reference = pd.DataFrame(rng.normal(0.5, 0.1, (rows, len(columns))), columns=columns)
    current = pd.DataFrame(rng.normal(0.52, 0.1, (rows, len(columns))), columns=columns)
    return _best(lambda: compute_drift(reference, current), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument(
        "--size", type=int, default=1280, help="JPEG side in px (a line camera frame)"
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    decode_rate, feature_rate = feature_throughput(args.images, args.size, args.repeat)
    print(
        f"plain full decode      {decode_rate:8.1f} images/s  ({args.images} JPEGs, {args.size} px)"
    )
    print(f"feature extraction     {feature_rate:8.1f} images/s")
    print(f"ratio features/decode  {feature_rate / decode_rate:8.2f}x  (target >= 1.0)")
    seconds = report_seconds(args.rows, args.repeat)
    print(
        f"drift report           {seconds:8.2f} s for {args.rows:,} reference"
        f" + {args.rows:,} current rows"
    )


if __name__ == "__main__":
    main()
