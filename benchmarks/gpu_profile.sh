#!/usr/bin/env bash
# The GPU profile of issue "scale and speed", as one prepared script (aimed at ≤ 8 minutes on an H100/H200; not yet run
# on a GPU, so its time is unverified: each run has a 300 s timeout): the SDXL-size UNet
# from SDXL's config (random weights) at 1024², bf16, gradient checkpointing on, batch 1 pair:
#   1. LoRA and full fine-tune: ours / floor / the public scripts' approach (ms/step, ratios, peak CUDA memory, MFU);
#   2. LoRA, 'ours' with each speed option toggled alone (sdpa kernels, channels-last, fused AdamW, compile once).
# Results land in $OUT (or benchmarks/results/gpu/) as JSON + markdown, named with the GPU.
#   bash benchmarks/gpu_profile.sh                 # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_profile.sh         # the same sequence on the CPU with the tiny preset (seconds): a syntax check
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
if [ "${SMOKE:-0}" = 1 ]; then
    common=(--preset tiny --device cpu --steps 1 --warmup 1 --memory off)
else
    common=(--preset sdxl --batch 1 --steps 8 --warmup 3 --mixed-precision bf16 --gradient-checkpointing on)
fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
run() { local name=$1; shift; echo "== $name"; timeout 300 python benchmarks/train_step.py "${common[@]}" "$@" --out "$out/$gpu-$name.json"; }
run lora --finetune lora
run full --finetune full
for option in model.sdpa_backend=flash model.sdpa_backend=efficient model.sdpa_backend=cudnn model.channels_last=true \
              optim.fused=true model.compile=true model.gradient_checkpointing=false; do
    run "lora-${option//[=.]/-}" --finetune lora --set "$option"
done
