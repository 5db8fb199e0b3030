#!/usr/bin/env bash
# What one lent GPU session runs, in one go (a GPU is lent only now and then, for minutes):
#   1. the GPU rows of `make bench`: WSS batched vs sequential, the grounded generator at 800 px with
#      real-size Grounding-DINO / SAM architectures, and the maskfree generator end to end with a BLIP-base-shaped
#      ITM (its selective search on the host's cores), and training steps/s of the OV Mask R-CNN (ResNet-50 FPN,
#      800 px) and of Semantic-SAM (SAM ViT-B), each alone on the GPU;
#   2. `ovtasks train-sam` on synthetic SA-1B-format masks, several encoder sizes side by side on the GPU
#      (time-bounded; each checkpoint records its exact command and held-out metrics).
# Results land in $OUT (or ./gpu-out): the five *_cuda.json files, one .tgz per SAM checkpoint, the log.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # on a CUDA machine with this repo's packages
#   DEVICE=cpu SAM_MINUTES=0.2 SA_IMAGES=64 BENCH=0 bash benchmarks/gpu_session.sh   # a dry run of the plumbing
#   BENCHES="grounded maskfree" SAM_CONFIGS= OUT=dir bash benchmarks/gpu_session.sh  # some benchmarks, no train-sam
# The timeouts add up to 16 minutes in the worst case and a lent GPU has about 15 in all: pick BENCHES to fit.
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
SAM_MINUTES=${SAM_MINUTES:-3.5}
SA_IMAGES=${SA_IMAGES:-750}   # per generator process; 16 processes
BENCH=${BENCH:-1}
BENCHES=${BENCHES:-"wss grounded maskfree train semantic_sam"}  # in this order; each bounded by its timeout
GROUNDED_NAMES=${GROUNDED_NAMES:-}  # extra workloads of N names per image (e.g. "1 4 8"); the loop side is slow
# one line per checkpoint: name image-size patch hidden layers heads [more train-sam flags]; SAM_CONFIGS= (empty): none
SAM_CONFIGS=${SAM_CONFIGS-"sam128-h64 128 8 64 2 2
sam128-h128 128 8 128 4 4
sam256-h64 256 8 64 2 2
sam256-h128 256 8 128 4 4"}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}${PYTHONPATH:+:}$PWD"
ovt() { "$PY" -m ovtasks.cli.main "$@"; }
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "host: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1)"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

# SA-1B-format training data: 16 generator processes, seeds 100.. (apart from the benchmark's and the ITM's)
SA=$(mktemp -d)/sa1b
if [ -n "$SAM_CONFIGS" ]; then
  for k in $(seq 0 15); do ovt synth-sa1b --out "$SA/s$((100 + k))" --images "$SA_IMAGES" --seed $((100 + k)) >/dev/null 2>>"$LOG" & done
  wait
  say "sa1b: $(find "$SA" -name '*.tar' | wc -l) tars"
fi

if [ "$BENCH" = 1 ]; then
  for bench in $BENCHES; do
    say "benchmark: $bench"
    case "$bench" in
      wss) timeout 120 "$PY" benchmarks/wss.py --device "$DEVICE" --out "$OUT/wss_cuda.json" ;;
      grounded) timeout 240 "$PY" benchmarks/grounded.py --device "$DEVICE" --size real --image-size 800 --dtype bfloat16 \
          --batch-size 16 --images 64 --max-detections 10 --names-per-image $GROUNDED_NAMES --out "$OUT/grounded_cuda.json" ;;
      maskfree) timeout 180 "$PY" benchmarks/maskfree_speed.py --device "$DEVICE" --size real --images 64 \
          --out "$OUT/maskfree_speed_cuda.json" ;;
      train) timeout 180 "$PY" benchmarks/train_speed.py --device "$DEVICE" --size real --steps 120 --batch-size 8 \
          --out "$OUT/train_speed_cuda.json" ;;
      semantic_sam) timeout 240 "$PY" benchmarks/train_speed.py --device "$DEVICE" --model semantic-sam --size real --steps 60 \
          --batch-size 4 --out "$OUT/train_speed_semantic_sam_cuda.json" ;;
      *) echo "unknown benchmark $bench (one of: wss grounded maskfree train semantic_sam)" >&2; false ;;
    esac >>"$LOG" 2>&1 || say "$bench failed: $?"
  done
fi

# SAM pretraining, the configurations side by side on the GPU
say "train-sam (${SAM_MINUTES} min each): $(echo "$SAM_CONFIGS" | cut -d' ' -f1 | tr '\n' ' ')"
W=$(mktemp -d)
while read -r name size patch hidden layers heads extra; do
  [ -n "$name" ] || continue
  OMP_NUM_THREADS=4 ovt train-sam --sa1b "$SA" --out "$W/$name" --device "$DEVICE" --steps 40000 --batch-size 32 --lr 1e-3 \
    --image-size "$size" --patch-size "$patch" --hidden "$hidden" --layers "$layers" --heads "$heads" \
    --max-minutes "$SAM_MINUTES" $extra > "$OUT/$name.log" 2>&1 &
done <<< "$SAM_CONFIGS"
wait
for d in "$W"/*; do
  [ -d "$d" ] || continue
  n=$(basename "$d")
  tail -n 14 "$OUT/$n.log" >> "$LOG"
  rm -f "$OUT/$n.log"
  tar -czf "$OUT/$n.tgz" -C "$W" "$n"
done
say "done"
