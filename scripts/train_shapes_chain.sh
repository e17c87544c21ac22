#!/usr/bin/env bash
# Trains the whole shapes-world chain -- KL-VAE, small CLIP, the CLIP's role fine-tune, latent U-Net -- and
# assembles the model folder, timing each stage:
#
#     bash scripts/train_shapes_chain.sh RUNS_DIR [MODEL_OUT] [key=value ...]
#
# Every stage is `jaxt2i train CONFIG workdir=RUNS_DIR/NAME ...` of the checkout the script lives in; key=value
# overrides go to every stage (e.g. `steps=2 batch_size=8 data.num_examples=16` runs the whole chain in a few
# minutes on a CPU, to check the machinery; the model it builds draws nothing useful). RUNS_DIR receives shapes_vae/, shapes_clip/,
# shapes_clip_role/, shapes_unet/ (each with checkpoints/, metrics.jsonl and the model folder final/) and
# chain_times.tsv (stage, seconds); MODEL_OUT (default RUNS_DIR/shapes_model) receives the float16 model folder
# that scripts/build_shapes_model.py writes -- pass jaxt2i/assets/shapes_model to replace the shipped default.
# A stage whose final/ already exists is not run again (an interrupted stage resumes from its newest checkpoint), so
# the same command continues an interrupted chain; every attempt at a stage appends its own line to chain_times.tsv
# (a failed one, or one whose process was killed, with its exit status), so a stage's time is the sum of its lines. Delete a stage's
# folder to retrain it. The build always runs (a few seconds) and overwrites MODEL_OUT.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/train_shapes_chain.sh RUNS_DIR [MODEL_OUT] [key=value ...]" >&2
    exit 2
fi
runs=$1
shift
model_out=$runs/shapes_model
if [[ $# -gt 0 && $1 != *=* ]]; then
    model_out=$1
    shift
fi
overrides=("$@")
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
train() { python -m jaxt2i.cli train "$@" "${overrides[@]}"; }
mkdir -p "$runs"
times=$runs/chain_times.tsv

stage() {  # stage NAME DONE_MARKER COMMAND...: runs COMMAND unless DONE_MARKER exists, appends its wall time
    local name=$1 marker=$2
    shift 2
    if [[ -n $marker && -e $marker ]]; then
        echo "== $name: $marker exists, skipped"
        return
    fi
    echo "== $name: $*"
    local t0 status=0
    t0=$(date +%s)
    "$@" || status=$?
    if ((status == 0)); then
        printf '%s\t%s\n' "$name" "$(($(date +%s) - t0))" | tee -a "$times"
    else
        printf '%s\t%s\t(exit %s)\n' "$name" "$(($(date +%s) - t0))" "$status" | tee -a "$times"
        exit "$status"
    fi
}

stage vae "$runs/shapes_vae/final" \
    train "$here/configs/shapes_vae.yaml" "workdir=$runs/shapes_vae"
stage clip "$runs/shapes_clip/final" \
    train "$here/configs/shapes_clip.yaml" "workdir=$runs/shapes_clip"
stage clip_role "$runs/shapes_clip_role/final" \
    train "$here/configs/shapes_clip_role.yaml" "workdir=$runs/shapes_clip_role" \
    "model.init_from=$runs/shapes_clip/final"
stage unet "$runs/shapes_unet/final" \
    train "$here/configs/shapes_unet.yaml" "workdir=$runs/shapes_unet" \
    "model.vae_from=$runs/shapes_vae/final" "model.text_encoder_from=$runs/shapes_clip_role/final" \
    "model.conditioner_init_from=$runs/shapes_clip_role/final"
stage build "" \
    python "$here/scripts/build_shapes_model.py" --run "$runs/shapes_unet/final" --vae "$runs/shapes_vae/final" \
    --clip "$runs/shapes_clip_role/final" --out "$model_out"
echo "== stage times (s):"
cat "$times"
