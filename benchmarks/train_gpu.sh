#!/usr/bin/env bash
# 10-minute bf16 training of tae-192 in the FLUX.2 latent space on one GPU (written for an H200).
#
#   bash benchmarks/train_gpu.sh            # SHARED=../shared OUT=runs/gpu-tae192 MINUTES=10
#
# 1. a 60-step probe measures steps/s (same settings, its own run folder; the latent cache it builds
#    is reused by the real run, so encoding is paid once and not counted in the 10 minutes);
# 2. the real run gets steps = MINUTES * 60 * steps/s, so its warm-up + cosine schedule ends on time;
# 3. prints images/s, the student's validation PSNR and the TAEF2 decoder's PSNR on the same crops.
set -euo pipefail
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/gpu-tae192}
MINUTES=${MINUTES:-10}
BATCH=${BATCH:-32}
RES=${RES:-256}
CACHE=${CACHE:-$OUT/cache}

common=(
  --teacher "$SHARED/weights/taef2_encoder.pth" --teacher-decoder "$SHARED/weights/taef2_decoder.pth"
  --decoder tae-192 --data "$SHARED/data/images/train" --val "$SHARED/data/images/val"
  --resolution "$RES" --batch-size "$BATCH" --lr 1e-3 --warmup 200 --ema 0.999
  --l1 1.0 --ms-ssim 0.2 --crops-per-image 16 --mixed-precision bf16 --workers 8
  --device-batch-encode 64 --val-count 64 --log-every 20 --cache-dir "$CACHE"
)

python -m fastdec train "${common[@]}" --steps 60 --val-every 1000000 --ckpt-every 1000000 --out "$OUT/probe"
rate=$(python - "$OUT/probe/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("images_per_s")]
print(float(rows[-1]["images_per_s"]))   # steady state: the last logging window
PY
)
steps=$(python -c "print(int($MINUTES * 60 * $rate / $BATCH))")
echo "probe: $rate images/s at ${RES} px, batch $BATCH -> $steps steps for $MINUTES min"

start=$(date +%s)
python -m fastdec train "${common[@]}" --steps "$steps" --val-every $((steps / 5 + 1)) --ckpt-every $((steps / 2 + 1)) \
  --out "$OUT/run"
echo "wall time: $(( $(date +%s) - start )) s"
python - "$OUT/run/metrics.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
speed = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
val = [r for r in rows if r.get("val_psnr")]
print(f"images/s (median of logging windows): {sorted(speed)[len(speed) // 2]:.0f}")
print(f"tae-192 val PSNR: {float(val[0]['val_psnr']):.2f} dB (untrained) -> {float(val[-1]['val_psnr']):.2f} dB "
      f"(step {val[-1]['step']}), SSIM {float(val[-1]['val_ssim']):.4f}")
print(f"TAEF2 decoder on the same crops: {float(rows[0]['teacher_val_psnr']):.2f} dB, "
      f"SSIM {float(rows[0]['teacher_val_ssim']):.4f}")
PY
