#!/usr/bin/env bash
# Train the demo model's DiT on from the shipped checkpoint on a GPU machine, and score the result.
#
# The shipped DiT trained 16,000 steps on a 2-core CPU and its loss was still falling (MODEL_CARD.md); a GPU
# does that many steps in minutes. This script needs nothing but the repository and torch: it unpacks the
# shipped checkpoint into a run, trains the DiT (clips drawn and encoded on the GPU every step), exports, and
# scores, for the new and the shipped DiT, one generated window per held-out prompt and one window that continues
# the prompt's own world from its first latent frame (can the DiT carry on shapes it is shown?).
#
#   MINUTES=15 STEPS=30000 BATCH=32 bash ops/train/gpu-dit.sh
#   TEXT_STEPS=8000 MINUTES=20 bash ops/train/gpu-dit.sh     # first teach the text encoder shapes
#   INIT=.carry/ck OBJECT_WEIGHT=1 MINUTES=20 bash ops/train/gpu-dit.sh   # go on from another exported checkpoint
#   POOL_CLIPS=300 BATCH=512 CALL_SECONDS=560 bash ops/train/gpu-dit.sh   # a pool held on the GPU; fit a call
#   DIT_CONFIG='{"patch": 2}' POOL_CLIPS=300 MINUTES=6 bash ops/train/gpu-dit.sh    # 2x2 patches, blocks warm
#   DIT_CONFIG='{"conv": [32, 64, 128]}' SHAPE_STEPS=2000 TEXT_STEPS=8000 bash ops/train/gpu-dit.sh  # U-Net stages
#   SHAPE_STEPS=2000 HEAD_STEPS=2000 TEXT_STEPS=8000 CALL_SECONDS=560 bash ops/train/gpu-dit.sh   # shape channels
#   DIT_CONFIG='{"conv": [32, 64, 128]}' STILLS=15360 STILLS_MINUTES=6 INIT=.carry/ck bash ops/train/gpu-dit.sh
#       # first single frames from a pool of stills, then video windows (INIT: a checkpoint with shape channels)
#
# The learning rate anneals over the MINUTES where they end before STEPS (--anneal-in-time), so the run ends
# annealed whatever the machine's speed.
#
# On a machine without the project's packages, prepare wheels first (../shared/tools/device-wheels.sh) and
# carry .whl: they are installed to /tmp/site. Results go to $OUT (default ./gpu-out), small enough to bring
# back from a lent machine: dit.safetensors (the EMA weights, fp32), dit.json, log.jsonl, window.json.
# To ship them, on the machine that keeps the repository:
#   longshot train unpack --run runs/gpu
#   cp gpu-out/dit.safetensors gpu-out/dit.json runs/gpu/dit/
#   cp gpu-out/text.safetensors gpu-out/text.json runs/gpu/text/                  # after TEXT_STEPS=N
#   cp gpu-out/model.json runs/gpu/ && cp gpu-out/vae.safetensors gpu-out/vae.json runs/gpu/vae/  # SHAPE_STEPS=N
#   longshot train export --run runs/gpu --out model/checkpoints/demo     # then `longshot eval` decides
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
run=${RUN:-$(mktemp -d)/run}
minutes=${MINUTES:-15}
# The whole script's budget in seconds (0: none). A lent machine's call has a hard limit (10 minutes here) that
# holds the install, the pool build and the export too; with CALL_SECONDS the training gets what is left of
# it once the pool is built, less a minute for saving and exporting, instead of a guessed MINUTES.
call_seconds=${CALL_SECONDS:-0}
started=$(date +%s)
steps=${STEPS:-30000}
batch=${BATCH:-32}
lr=${LR:-3e-4}
device=${DEVICE:-cuda}
prompts=${PROMPTS:-32}  # held-out prompts to score (0: score elsewhere)
init=${INIT:-model/checkpoints/demo}  # the exported checkpoint the run starts from
object_weight=${OBJECT_WEIGHT:-0}     # --object-weight: extra loss on the latent pixels objects cover
save_every=${SAVE_EVERY:-500}
# Worker processes drawing the worlds of coming steps: drawn in one process, a batch of 32 windows takes about
# half a second of CPU, longer than the GPU step it feeds.
loader_workers=${LOADER_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
images=${IMAGES:-0}  # single images of fresh worlds per batch besides the windows (--images)
# Text encoder steps with shape variants before the DiT (0: keep the shipped text encoder). The shipped one is
# nearly blind to shape words; 8,000 steps with --shape-variants 4 taught it shapes (ops/train/EXPERIMENTS.md,
# "Every shape comes out round"). Its weights then come back too (text.safetensors, text.json).
text_steps=${TEXT_STEPS:-0}
# Clips of a latent pool to build first (0: draw every step's worlds afresh). The loader workers draw the pool's
# worlds once, the GPU encodes them, and the DiT then trains on windows cut from the pool in GPU memory, with no
# CPU work per step; a clip holds one world, so the pool trades fresh layouts for speed. On one H100 machine a
# pool built at about 6 clips a second (1,500 clips took 260 s of a 10-minute call): a few hundred leave most of
# a call to training.
pool_clips=${POOL_CLIPS:-0}
# JSON merged into the run's DiT architecture before training, e.g. '{"patch": 2}': 2x2 patches see each object
# as four times as many tokens. Tensors whose shape changes (patch embedding, output layer) start fresh, the
# blocks are warm-started from INIT.
dit_config=${DIT_CONFIG:-}
# Shape channels (ops/train/EXPERIMENTS.md, "Shape channels beside the latents"): the one change that has made a
# generator draw squares, with a text encoder that tells shapes apart (TEXT_STEPS). SHAPE_STEPS > 0 widens the
# VAE of an INIT without them by four channels holding each shape's coverage: its decoder trains SHAPE_STEPS on
# the frozen encoder (half its batches circles' latents beside the true channels, latents degraded as a DiT's
# are), then the encoder's shape head HEAD_STEPS alone, and the DiT widens to them (new weights at zero). The
# VAE and model.json then come back too; chain later calls through the exported checkpoint as INIT.
shape_steps=${SHAPE_STEPS:-0}
# Stills to pool before the video windows (0: none). The DiT first trains STILLS_MINUTES on single frames, one
# world's first frame each (`longshot train latents --stills`), then on video windows from those weights: on the
# CPU, single frames of many worlds are where a DiT with `conv` stages learnt to draw squares, triangles and
# diamonds (ops/train/EXPERIMENTS.md, "The convolutional-stage DiT for 12,000 single-frame steps").
stills=${STILLS:-0}
stills_minutes=${STILLS_MINUTES:-5}
stills_batch=${STILLS_BATCH:-256}
head_steps=${HEAD_STEPS:-2000}
shape_batch=${SHAPE_BATCH:-16}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

python3 -m model.train unpack --run "$run" --init-from "$init"
if [ -n "$dit_config" ]; then
  python3 - "$run/model.json" "$dit_config" <<'PY'
import json, sys
path, change = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(path))
config["dit"].update(change)
json.dump(config, open(path, "w"), indent=2)
print("DiT architecture:", config["dit"])
PY
  rm -f "$run/dit/dit.safetensors" "$run/dit/state.pt"  # the unpacked DiT has the old shapes
fi
if [ "$shape_steps" -gt 0 ]; then
  python3 - "$run/model.json" <<'PY'
import json, sys
from model.world import SHAPES
path = sys.argv[1]
config = json.load(open(path))
if config["vae"].get("shape_channels"):
    sys.exit("SHAPE_STEPS: the VAE of INIT already has shape channels; chain with SHAPE_STEPS=0")
config["vae"].update(latent_channels=config["vae"]["latent_channels"] + len(SHAPES), shape_channels=len(SHAPES))
json.dump(config, open(path, "w"), indent=2)
print("VAE architecture:", config["vae"])
PY
  # The unpacked VAE and DiT have the old shapes: both warm-start from INIT instead.
  rm -f "$run/vae/vae.safetensors" "$run/vae/state"*.pt "$run/dit/dit.safetensors" "$run/dit/state.pt"
  python3 -m model.train vae --run "$run" --init-from "$init" --decoder-only --circled 0.5 --degrade 0.8 \
    --seam 4 --steps "$shape_steps" --batch "$shape_batch" --lr 5e-4 --log-every 100 --device "$device" 2>&1 \
    | tee "$out/train-vae.txt"
  python3 -m model.train vae --run "$run" --head-only --steps "$head_steps" --batch "$shape_batch" --lr 1e-3 \
    --log-every 100 --device "$device" 2>&1 | tee "$out/train-head.txt"
  cp "$run/model.json" "$run/vae/vae.safetensors" "$run/vae/vae.json" "$out/"
fi
if [ "$text_steps" -gt 0 ]; then
  rm "$run/text/text.safetensors"  # so that the text part warm-starts from the checkpoint with a fresh optimiser
  python3 -m model.train text --run "$run" --init-from "$init" --steps "$text_steps" --lr 1e-3 \
    --shape-variants 4 --log-every 500 --device "$device" 2>&1 | tee "$out/train-text.txt"
  cp "$run/text/text.safetensors" "$run/text/text.json" "$out/"
fi
if [ "$pool_clips" -gt 0 ]; then
  python3 -m model.train latents --run "$run" --clips "$pool_clips" --loader-workers "$loader_workers" \
    --device "$device" > "$out/latents.txt" 2>&1
  tail -n 2 "$out/latents.txt"
  windows=(--latents)
else
  windows=(--loader-workers "$loader_workers")
fi
dit_init=$init
if [ "$stills" -gt 0 ]; then
  python3 -m model.train latents --run "$run" --stills --clips "$stills" --loader-workers "$loader_workers" \
    --device "$device" > "$out/stills.txt" 2>&1
  tail -n 1 "$out/stills.txt"
  python3 -m model.train dit --run "$run" --init-from "$init" --latents "$run/stills.zarr" --steps "$steps" \
    --batch "$stills_batch" --lr "$lr" --minutes "$stills_minutes" --anneal-in-time --save-every "$save_every" \
    --log-every 100 --device "$device" 2>&1 | tee "$out/train-stills.txt"
  # The video windows warm-start from these weights with a fresh optimiser and schedule.
  mkdir -p "$run/stills-stage" && rm -rf "$run/stills-stage/dit" && mv "$run/dit" "$run/stills-stage/dit"
  dit_init=$run/stills-stage
fi
if [ "$call_seconds" -gt 0 ]; then
  minutes=$(python3 -c "print(round(max(0.5, ($call_seconds - ($(date +%s) - $started) - 60) / 60), 2))")
  echo "training for $minutes min of the call's $call_seconds s"
fi
python3 -m model.train dit --run "$run" --init-from "$dit_init" --steps "$steps" --batch "$batch" \
  --images "$images" --object-weight "$object_weight" --lr "$lr" --minutes "$minutes" --anneal-in-time \
  "${windows[@]}" \
  --save-every "$save_every" --log-every 100 --device "$device" 2>&1 | tee "$out/train.txt"
cp "$run/dit/dit.safetensors" "$run/dit/dit.json" "$out/"
if [ -f "$run/dit/log.jsonl" ]; then cp "$run/dit/log.jsonl" "$out/"; fi  # written every 100 steps
python3 -m model.train export --run "$run" --out "$run/export"
[ "$prompts" -gt 0 ] || exit 0

python3 - "$run/export" "$prompts" "$device" > "$out/window.json" <<'PY'
import json, sys
from model.generator import Generator
from orchestrator.evaluate import continuation_adherence, eval_prompts, image_adherence, window_adherence

trained, count, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
report = {}
for name, path in (("shipped", Generator.default_checkpoint()), ("trained", trained)):
    generator = Generator.load(path, device=device)
    settings = dict(width=128, height=80, fps=24, steps=8, guidance=4.0)
    report[name] = window_adherence(generator, eval_prompts(count), **settings)
    # Whether the DiT can carry on the shapes of an observed frame at all (the shipped one cannot).
    report[name]["continuation"] = continuation_adherence(generator, eval_prompts(count), **settings)
    # One still per prompt, over more prompts (a still costs a sixteenth of a window): the layouts alone.
    report[name]["image"] = image_adherence(generator, eval_prompts(4 * count), **settings)
print(json.dumps(report, indent=2))
PY
cat "$out/window.json"
