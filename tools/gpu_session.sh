#!/usr/bin/env bash
# Every GPU check zoedge has, in one command, for a short rented CUDA machine (results under $OUT or ./gpu-out).
#
#   bash tools/gpu_session.sh            # needs: python3 with torch (CUDA), transformers, safetensors, accelerate
#
# Optional: $WHEELS (a folder of extra wheels, e.g. bitsandbytes, installed with --no-index first) and
# $TOKENIZER (a tokenizer folder, e.g. the converted default model's, so `zoedge finetune` can run on a
# random-weights SmolLM2-shaped checkpoint). Each stage has its own time limit, so one hang loses one stage.
# QUICK=1 runs only the gpu-marked tests and the plugin stage (about 2 minutes on an H200).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
W="${WORK:-/tmp/zoedge-gpu}"; mkdir -p "$W"
export ZOEDGE_CACHE="$W/cache"
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage setup
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$WHEELS"/*.whl && export PYTHONPATH="$W/site"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$W/pip.log" 2>&1 || tail "$W/pip.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
nproc; free -g | head -2

stage "gpu-marked tests"
timeout 240 python3 -m pytest -m gpu -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40

if [[ -z "${QUICK:-}" ]]; then
stage "bench_stream: SmolLM2-135M shape (random weights), fp16 and fp32, ram tier"
timeout 100 python3 -m zoedge.cli synth smollm2-135m "$W/smol" --no-progress ${TOKENIZER:+--tokenizer-from "$TOKENIZER"}
for dt in fp16; do
  timeout 90 python3 tools/bench_stream.py --model "$W/smol" --workdir "$W/bs-smol" --device cuda --dtype $dt \
    --batch 16 --seq 256 --repeat 10 --no-auto-profile --json "$OUT/bench_stream_smol_$dt.json" 2>>"$OUT/stderr.log" | tail -14
done

stage "bench_stream: Llama-2-7B width, 6 layers (random), fp16, ram tier, prefetch 1 and 2"
timeout 120 python3 -m zoedge.cli synth llama-2-7b "$W/l7" --layers 6 --dtype fp16 --no-progress
for pf in 1 2; do
  timeout 90 python3 tools/bench_stream.py --model "$W/l7" --workdir "$W/bs-l7" --device cuda --dtype fp16 \
    --prefetch $pf --batch 8 --seq 512 --repeat 8 --no-auto-profile --json "$OUT/bench_stream_l7_pf$pf.json" 2>>"$OUT/stderr.log" | tail -14
done

stage "zoedge memory and zoedge bench on CUDA (MeZO step, Llama-2-7B width, 6 layers, fp16, batch 8 x 512)"
timeout 90 zoedge memory "$W/bs-l7/store-fp16" --device cuda --batch-size 8 --max-length 512 --steps 2 --no-progress \
  --json "$OUT/memory_l7.json" 2>>"$OUT/stderr.log" | tail -20
timeout 120 zoedge bench "$W/bs-l7/store-fp16" --device cuda --batch-size 8 --max-length 512 --steps 5 --compare resident \
  --no-progress --json "$OUT/bench_l7.json" 2>>"$OUT/stderr.log" | tail -20

fi

if [[ -n "${TOKENIZER:-}" ]]; then
  stage "every shipped plugin: 6 finetune steps on CUDA (4-layer SmolLM2 shape, random weights; FO blocks, factors, phases)"
  timeout 60 python3 -m zoedge.cli synth smollm2-135m "$W/smol4" --layers 4 --no-progress --tokenizer-from "$TOKENIZER"
  for spec in "loho --opt fo_optimizer=adamw8bit" "loho --opt mode=intra" "hzo --opt fo_layers=1 --opt nu=3" \
              "hizoo-l" "dizo --opt cycle=3 --opt iters=2"; do
    name="${spec// /_}"; name="${name//=/-}"
    timeout 60 zoedge finetune --model "$W/smol4" --device cuda --optimizer $spec --steps 6 --eval-every 0 \
      --n-dev 32 --n-test 32 --no-progress --output "$W/ft-$name" 2>&1 | tail -2 | sed "s|^|[$spec] |"
  done
fi

if [[ -n "${TOKENIZER:-}" && -z "${QUICK:-}" ]]; then
  stage "finetune: MeZO on CUDA, SmolLM2 shape (random weights), demo task, 20 steps"
  timeout 120 zoedge finetune --model "$W/smol" --device cuda --steps 20 --n-dev 64 --n-test 64 --no-progress \
    --output "$W/ft" 2>&1 | tail -8
  cp "$W/ft/summary.json" "$OUT/finetune_summary.json" 2>/dev/null
fi
stage done
