"""Step benchmark that needs only torch + torchvision (no pydantic, Ray, MLflow, albumentations): mocolab's own
training step (``mocolab.train.step.TrainStep`` on ``mocolab.moco.model.MoCo``, what every worker runs) in fp32,
bf16 autocast, fp16 autocast with its GradScaler, and bf16 + channels_last, against the fp32 reference loop,
interleaved in one process, each ratio with its spread over the repetitions, plus the torch.profiler breakdown of
the bf16 + channels_last step. Run by ``gpu_check.sh``; works from a plain checkout (it puts ``platform/`` on the
import path itself).

    python platform/benchmarks/step_bench.py --device cuda --arch resnet50 --image-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # platform/: import mocolab without installing it

import torch  # noqa: E402

from mocolab.bench.profile import profile_step  # noqa: E402
from mocolab.bench.report import format_spread, format_table, format_value  # noqa: E402
from mocolab.bench.spec import StepSpec  # noqa: E402
from mocolab.bench.step import REFERENCE, compare_steps  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--arch", default="resnet50", choices=("small_cnn", "resnet18", "resnet34", "resnet50"))
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem, no max-pool (CIFAR ResNets)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="per GPU")
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--momentum", type=float, default=0.999)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--linear-head", action="store_true", help="MoCo v1 / CIFAR demo linear head (default: v2 MLP)")
    p.add_argument(
        "--bn",
        default="shuffle",
        choices=("shuffle", "split", "plain"),
        help="shuffle: one worker's share of shuffle-BN (default); split: SplitBatchNorm (--bn-splits)",
    )
    p.add_argument("--bn-splits", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time the bf16 step with torch.compile'd encoders")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=5, help="0 skips the profiler breakdown")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def variants(args: argparse.Namespace) -> dict[str, StepSpec]:
    """The contenders: fp32, bf16 and fp16 autocast (contiguous), bf16 + channels_last (+ compiled when asked)."""
    base = StepSpec(
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        cifar_stem=args.cifar_stem,
        bn=args.bn,
        bn_splits=args.bn_splits,
        dim=args.dim,
        queue_size=args.queue_size,
        momentum=args.momentum,
        temperature=args.temperature,
        mlp=not args.linear_head,
        device=args.device,
    )
    specs = {
        "mocolab fp32": base,
        "mocolab bf16": base.replace(precision="bf16"),
        "mocolab fp16": base.replace(precision="fp16"),
        "mocolab bf16+cl": base.replace(precision="bf16", channels_last=True),
    }
    if args.compile:
        specs["mocolab bf16+cl+compile"] = specs["mocolab bf16+cl"].replace(compile=True)
    return specs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("step_bench: no CUDA device visible to torch; pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    specs = variants(args)
    first = next(iter(specs.values()))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    comparison = compare_steps(specs, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
    ratios = {name: comparison.ratio(name) for name in comparison.rates}
    rows = [[name, format_value(rate), format_spread(ratios[name])] for name, rate in comparison.img_s.items()]
    title = (
        f"{first.arch}{'-cifar' if first.cifar_stem else ''}@{first.image_size} batch {first.batch_size} "
        f"K={first.queue_size} bn={first.bn} on {device_name}, torch {torch.__version__}"
    )
    print(title)
    print(format_table(rows, ["step", "img/s", f"vs {REFERENCE} fp32 [min, max] xrepeats"]))
    noisy = [name for name, ratio in ratios.items() if ratio.noisy]
    if noisy:
        print(f"too noisy for a verdict on {', '.join(noisy)}: rerun with more --repeats or on a quiet machine")
    record = {
        "title": title,
        "img_s": comparison.img_s,
        "ratio_vs_reference": {n: r.median for n, r in ratios.items()},
        "spread": {n: r.as_dict() for n, r in ratios.items()},
    }
    if args.profile_steps > 0:
        fractions = profile_step(specs["mocolab bf16+cl"], steps=args.profile_steps, warmup=args.warmup)
        record["profile_bf16_cl"] = fractions
        print("profile of mocolab bf16+cl (fraction of the step):")
        print(format_table([[k, f"{v:.4f}"] for k, v in fractions.items()], ["phase", "fraction"]))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
