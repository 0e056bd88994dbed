"""Decode + augmentation + step per GPU for both input pipelines (``data.pipeline=cpu|device``), and the CPU cores
per GPU each needs to keep the GPU busy. Run by ``gpu_check.sh``; needs the project's requirements (albumentations
for the cpu pipeline, kornia for the device one), not Ray or MLflow; puts ``platform/`` on the import path itself.

- cpu: one core decodes (PIL) and two-crops (albumentations) every image; the GPU copies the views and steps.
- device: one core turns file bytes into tensors; the GPU decodes (torchvision ``decode_jpeg``, nvJPEG on CUDA),
  two-crops (kornia) and steps.

CPU cores per GPU = the GPU's img/s with that pipeline / the pipeline's CPU img/s per core. Files are read from
memory (a page-cached local disk; network storage adds its own cost to both). Images: scikit-learn's two sample
photos (427x640 JPEGs) unless ``--images DIR``.

    python platform/benchmarks/pipeline_bench.py --device cuda --arch resnet50 --image-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # platform/: import mocolab without installing it

import torch  # noqa: E402

TARGET_IMG_S = 3500  # a ResNet-50 MoCo step in bf16 on one H100 (issue 22)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--arch", default="resnet50", choices=("small_cnn", "resnet18", "resnet50"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="per GPU")
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--augment", default="moco_v2", choices=("moco_v1", "moco_v2"))
    p.add_argument("--images", type=Path, default=None, help="a folder of JPEGs (default: scikit-learn's samples)")
    p.add_argument("--steps", type=int, default=10, help="timed GPU steps per repetition")
    p.add_argument("--cpu-images", type=int, default=200, help="images per repetition of the per-core timings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def jpeg_files(folder: Path | None) -> list[bytes]:
    """The encoded bytes of every JPEG in ``folder`` (default: scikit-learn's sample photos)."""
    if folder is None:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
    files = [p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not files:
        raise SystemExit(f"pipeline_bench: no .jpg/.jpeg files in {folder}")
    return files


def cycle(files: list[bytes], count: int) -> list[bytes]:
    return [files[i % len(files)] for i in range(count)]


def median_rate(run: Callable[[], int], repeats: int, warmup: int = 1) -> float:
    """Median over ``repeats`` of items/s of ``run`` (which returns how many items it did)."""
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = run()
        rates.append(done / (time.perf_counter() - started))
    return statistics.median(rates)


def cpu_decode_augment(files: list[bytes], augment: str, size: int) -> Callable[[], int]:
    """One core's work in the cpu pipeline: PIL decode + the albumentations two-crop of every image."""
    from mocolab.data.augment import two_crop_transform
    from mocolab.data.images import decode_rgb

    transform = two_crop_transform(augment, size)

    def run() -> int:
        for i, data in enumerate(files):
            transform(decode_rgb(data, f"#{i}"))
        return len(files)

    return run


def cpu_bytes(files: list[bytes], batch_size: int) -> Callable[[], int]:
    """One core's work in the device pipeline: bytes to tensors and the batch (what the loader's collate does)."""
    from mocolab.data.encoded import collate_encoded

    def run() -> int:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            collate_encoded(
                [(torch.frombuffer(bytearray(d), dtype=torch.uint8), f"#{i}", i) for i, d in enumerate(chunk)]
            )
        return len(files)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_loop(args: argparse.Namespace, batch: Callable[[], tuple], device: torch.device) -> Callable[[], int]:
    """``args.steps`` training steps (bf16, channels_last) on the views ``batch()`` makes on the device."""
    from mocolab.bench.spec import StepSpec
    from mocolab.bench.step import train_step

    spec = StepSpec(
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        precision="bf16",
        channels_last=True,
        device=str(device),
    )
    step = train_step(spec)
    index = torch.arange(args.batch_size, device=device)

    def run() -> int:
        for _ in range(args.steps):
            im_q, im_k = batch()
            step(im_q, im_k, index)
        sync(device)
        return args.steps * args.batch_size

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("pipeline_bench: no CUDA device visible to torch; pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    from mocolab.data.augment import two_crop_transform
    from mocolab.data.encoded import DeviceViews, EncodedBatch
    from mocolab.data.images import decode_rgb
    from mocolab.data.normalize import normalize_views

    device = torch.device(args.device)
    files = jpeg_files(args.images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-core timings
    per_core = {
        "cpu": median_rate(
            cpu_decode_augment(cycle(files, args.cpu_images), args.augment, args.image_size), args.repeats
        ),
        "device": median_rate(cpu_bytes(cycle(files, args.cpu_images), args.batch_size), args.repeats),
    }
    torch.set_num_threads(threads)

    # cpu pipeline on the GPU: the host's uint8 views (pinned on CUDA) copied, normalised there as in training, stepped
    transform = two_crop_transform(args.augment, args.image_size)
    views = [transform(decode_rgb(d, "#")) for d in cycle(files, args.batch_size)]
    host = [torch.stack([v[j] for v in views]) for j in (0, 1)]
    host = [t.pin_memory() for t in host] if device.type == "cuda" else host
    copied = lambda: tuple(normalize_views(t.to(device, non_blocking=True)) for t in host)  # noqa: E731

    # device pipeline on the GPU: bytes copied, decoded, two-cropped and stepped
    payloads = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in cycle(files, args.batch_size)]
    encoded = EncodedBatch(payloads, [f"#{i}" for i in range(len(payloads))], torch.arange(len(payloads)))
    device_views = DeviceViews(args.augment, args.image_size, "fail", device, args.batch_size)
    decoded = lambda: device_views(encoded)[:2]  # noqa: E731

    gpu = {
        "cpu": median_rate(gpu_loop(args, copied, device), args.repeats, args.warmup),
        "device": median_rate(gpu_loop(args, decoded, device), args.repeats, args.warmup),
    }
    augment_only = median_rate(lambda: (decoded(), sync(device), args.batch_size)[2], args.repeats, args.warmup)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.arch}@{args.image_size} batch {args.batch_size} bf16 channels_last, {args.augment}, "
        f"{len(files)} JPEG(s), on {name}, torch {torch.__version__}"
    )
    print(
        f"target: {TARGET_IMG_S:,} img/s per H100 (ResNet-50 MoCo step, 224 px, bf16, channels_last, batch 128 per GPU)"
    )
    print(f"{'pipeline':<9} {'CPU img/s per core':>19} {'GPU img/s (decode+aug+step)':>28} {'CPU cores per GPU':>18}")
    record = {
        "device": name,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "augment": args.augment,
        "target_img_s": TARGET_IMG_S,
        "pipelines": {},
    }
    for pipeline in ("cpu", "device"):
        cores = gpu[pipeline] / per_core[pipeline]
        print(f"{pipeline:<9} {per_core[pipeline]:>19.0f} {gpu[pipeline]:>28.0f} {cores:>18.2f}")
        record["pipelines"][pipeline] = {
            "cpu_img_s_per_core": per_core[pipeline],
            "gpu_img_s": gpu[pipeline],
            "cores_per_gpu": cores,
        }
    cores_at_target = TARGET_IMG_S / per_core["cpu"]
    print(
        f"device decode + two crops alone: {augment_only:.0f} img/s; at the target the cpu pipeline needs "
        f"{cores_at_target:.1f} cores per GPU"
    )
    record["device_decode_augment_img_s"] = augment_only
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
