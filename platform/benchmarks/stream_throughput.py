"""Epoch images/s of pretraining for the ways of reading data (issue 20): (a) a local folder with today's
DataLoader (``data.reader=loader``), (b) the same folder through Ray Data (``data.reader=stream``), (c) the same
images in an S3-compatible store on 127.0.0.1 (moto's server) through Ray Data, (d) that store through the
DataLoader (each worker reads its own objects through ``data.location``).

Each run is a real ``mocolab pretrain`` (``mocolab.bench.pretrain_run``: a subprocess with its own local Ray, kNN
monitor and evaluations off, first epoch dropped as warm-up); the three readers alternate round by round, and the
table gives the median [min, max] of whole-epoch images/s over the rounds and the 1-minute load average seen
around the runs (the machine may be shared).

    python platform/benchmarks/stream_throughput.py CONFIG --images 512 --rounds 3 [--set KEY=VALUE ...]

CONFIG must be an ``imagefolder`` config; its first ``--images`` training images (and a tenth as many test ones)
are copied into a scratch folder and uploaded to the store. Needs ``moto[server]`` and ``boto3`` (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
from pathlib import Path

READERS = ("loader-local", "stream-local", "stream-s3", "loader-s3")
BUCKET = "mocolab-bench"


def copy_subset(cfg, images: int, dest: Path) -> None:
    """The first ``images`` training images (class-balanced, as ``data.limit_train`` picks them) and a tenth as many
    test images of ``cfg.data``, copied as ``dest/<split>/<class>/<file>``."""
    from mocolab.data.sources import image_source

    for split, limit in (("train", images), ("test", max(images // 10, 1))):
        data = cfg.data.model_copy(update={"limit_train": limit, "limit_test": limit})
        for path in image_source(data, split).paths:
            relative = Path(path).relative_to(Path(cfg.data.root) / getattr(cfg.data, f"{split}_split"))
            (dest / split / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / split / relative)


def start_store(folder: Path):
    """moto's S3 server on a free port, the AWS environment of this process (inherited by the runs) pointing at
    it, and ``folder`` uploaded to ``s3://mocolab-bench/data``; returns the server."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"data/{path.relative_to(folder).as_posix()}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from mocolab.bench.pretrain_run import run_timed_pretrain
    from mocolab.config import load_config

    base = load_config(args.config, args.overrides)
    work = Path(tempfile.mkdtemp(prefix="mocolab-stream-bench-"))
    local = work / "images"
    copy_subset(base, args.images, local)
    server = start_store(local)
    uri = f"s3://{BUCKET}/data"
    roots = {"loader-local": str(local), "stream-local": str(local), "stream-s3": uri, "loader-s3": uri}
    rates: dict[str, list[float]] = {name: [] for name in READERS}
    loads = [os.getloadavg()[0]]
    try:
        for round_no in range(args.rounds):
            for name in READERS:
                reader = name.split("-")[0]
                cfg = load_config(
                    args.config,
                    [
                        *args.overrides,
                        f"data.root={roots[name]}",
                        f"data.reader={reader}",
                        "data.limit_train=null",
                        "data.limit_test=null",
                    ],
                )
                times = run_timed_pretrain(cfg, work / f"{name}-{round_no}", epochs=args.epochs)
                rates[name].append(times.epochs.img_s)
                loads.append(os.getloadavg()[0])
                print(f"round {round_no + 1} {name}: {times.epochs.img_s:.1f} img/s (load {loads[-1]:.1f})", flush=True)
    finally:
        server.stop()
    summary = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v} for name, v in rates.items()
    }
    print(
        f"{'reader':<14} epoch img/s median [min, max] over {args.rounds} rounds, {args.images} images, "
        f"load average {min(loads):.1f}-{max(loads):.1f}"
    )
    for name, s in summary.items():
        ratio = s["median"] / summary["loader-local"]["median"]
        print(f"{name:<14} {s['median']:7.1f} [{s['min']:.1f}, {s['max']:.1f}]  x{ratio:.2f} of loader-local")
    if args.json:
        args.json.write_text(json.dumps({"readers": summary, "load_average": loads}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
