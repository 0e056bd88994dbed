#!/usr/bin/env bash
# GPU check of mocolab's own training step (mocolab.train.step.TrainStep on mocolab.moco.model.MoCo, what every
# worker runs): fp32, bf16 autocast, fp16 autocast + GradScaler, and bf16 + channels_last against the plain fp32
# reference loop (same process, interleaved, each ratio with its spread over the repetitions), for ResNet-50 at
# 224 and the CIFAR demo's ResNet-18 at 32, plus the torch.profiler breakdown (targets: bf16+cl >= 1.5x the
# reference at ResNet-50/224; momentum + queue update <= 0.03 of the step). Then decode + augmentation + step per GPU
# for both input pipelines (data.pipeline=cpu|device; ResNet-50, 224 px, bf16, channels_last, batch 128 per GPU):
# img/s and the CPU cores per GPU each needs, against the 3,500 img/s per H100 target (pipeline_bench.py).
# Installs nothing: the step timings need python3 with torch and torchvision (no Ray, MLflow, pydantic); the
# pipeline timings also need the project's requirements (albumentations, kornia, scikit-learn's sample photos).
#
#   platform/benchmarks/gpu_check.sh            # on a machine with a CUDA GPU (about 2 minutes)
#   platform/benchmarks/gpu_check.sh --smoke    # tiny sizes on the CPU: checks that the script runs
#
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

device=cuda
timing=(--steps 20 --repeats 5 --warmup 5 --profile-steps 5)
r50=(--arch resnet50 --image-size 224 --batch-size 64 --queue-size 65536 --momentum 0.999 --temperature 0.2)
r18=(--arch resnet18 --cifar-stem --image-size 32 --batch-size 512 --queue-size 4096 --momentum 0.99
     --temperature 0.1 --linear-head --bn split --bn-splits 8)
pipes=(--arch resnet50 --image-size 224 --batch-size 128 --queue-size 65536)
case "${1:-}" in
  "") ;;
  --smoke)
    device=cpu
    timing=(--steps 1 --repeats 1 --warmup 1 --profile-steps 1)
    pipes=(--arch small_cnn --image-size 32 --batch-size 4 --queue-size 16 --steps 1 --cpu-images 8 --repeats 1
           --warmup 1)
    r50=(--arch resnet50 --image-size 32 --batch-size 4 --queue-size 16)
    r18=(--arch resnet18 --cifar-stem --image-size 16 --batch-size 8 --queue-size 16 --linear-head --bn split --bn-splits 2)
    ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

"$python" - <<'PY'
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")
PY
echo
echo "== ResNet-50 at 224 (MoCo v2: MLP head, K=65536, one worker's shuffle-BN) =="
"$python" "$here/step_bench.py" --device "$device" "${r50[@]}" "${timing[@]}"
echo
echo "== ResNet-18 CIFAR stem at 32 (MoCo CIFAR demo: linear head, K=4096, SplitBatchNorm x8) =="
"$python" "$here/step_bench.py" --device "$device" "${r18[@]}" "${timing[@]}"
echo
echo "== Input pipelines: decode + augmentation + step per GPU (data.pipeline=cpu|device) =="
"$python" "$here/pipeline_bench.py" --device "$device" "${pipes[@]}"
