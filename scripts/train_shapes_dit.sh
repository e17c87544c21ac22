#!/usr/bin/env bash
# Trains the shipped text DiT (`dit-shapes`) on the shipped shapes model's frozen VAE and text encoder, and builds
# its float16 model folder, timing each stage:
#
#     bash scripts/train_shapes_dit.sh RUNS_DIR [MODEL_OUT] [key=value ...]
#
# RUNS_DIR receives shapes_dit/ (checkpoints/, metrics.jsonl, the model folder final/) and dit_times.tsv (stage,
# seconds); MODEL_OUT (default RUNS_DIR/dit_shapes_model) receives the folder scripts/build_shapes_model.py writes,
# which refers to the shipped model's VAE, text encoder and CLIP image tower instead of copying them -- pass
# jaxt2i/assets/dit_shapes_model to replace the shipped one. key=value overrides go to the training stage (e.g.
# `steps=20 data.num_examples=64` checks the machinery in a minute). The training stage resumes from its newest
# checkpoint when interrupted and is skipped once its final/ exists; the build always runs.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/train_shapes_dit.sh RUNS_DIR [MODEL_OUT] [key=value ...]" >&2
    exit 2
fi
runs=$1
shift
model_out=$runs/dit_shapes_model
if [[ $# -gt 0 && $1 != *=* ]]; then
    model_out=$1
    shift
fi
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
shipped=$here/jaxt2i/assets/shapes_model
mkdir -p "$runs"
times=$runs/dit_times.tsv

timed() {  # timed NAME COMMAND...: runs COMMAND, appends its wall time (and a failure's exit status)
    local name=$1 t0 status=0
    shift
    echo "== $name: $*"
    t0=$(date +%s)
    "$@" || status=$?
    printf '%s\t%s%s\n' "$name" "$(($(date +%s) - t0))" "$( ((status)) && echo "	(exit $status)")" | tee -a "$times"
    return "$status"
}

if [[ -e $runs/shapes_dit/final ]]; then
    echo "== dit: $runs/shapes_dit/final exists, skipped"
else
    timed dit python -m jaxt2i.cli train "$here/configs/shapes_dit.yaml" "workdir=$runs/shapes_dit" \
        "model.vae_from=$shipped" "model.text_encoder_from=$shipped" "$@"
fi
timed build python "$here/scripts/build_shapes_model.py" --run "$runs/shapes_dit/final" --clip "$shipped" \
    --share shapes --out "$model_out" --max-mb 10 --guidance 3
echo "== stage times (s):"
cat "$times"
