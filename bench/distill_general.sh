#!/usr/bin/env bash
# The general drafters shipped in cosine/drafters/weights/: `cosine distill` on the built-in
# general mix (see the README's "Drafters" section for the sources), both kinds from one set of
# target labels (the work directory is shared; each kind has its own checkpoint).
#
#   bash bench/distill_general.sh OUT_DIR [DEVICE] [extra `cosine distill` options...]
#
# DEVICE: cuda (one H100: minutes) or cpu (the same budget takes many hours; lower it with
# e.g. --text-tokens 500000 --chat-prompts 400). Extra options override the budget below.
set -euo pipefail
out=${1:?usage: distill_general.sh OUT_DIR [DEVICE] [options]}
device=${2:-cuda}
shift $(( $# < 2 ? $# : 2 ))
work=${COSINE_DISTILL_WORK:-$HOME/.cache/cosine/distill/general}
python=${PYTHON:-python}
budget=(--work "$work" --device "$device" --seed 0
        --text-tokens 6000000 --vocab-corpus-tokens 6000000 --chat-prompts 6144 --answer-tokens 160
        --seq-len 256 --vocab 8192 --label-batch 64 --generation-batch 256 --batch-size 64 --epochs 2)
"$python" -m cosine.cli distill --kind feature --unroll 3 --out "$out/general-feature" "${budget[@]}" "$@"
"$python" -m cosine.cli distill --kind small --layers 2 --out "$out/general-small" "${budget[@]}" "$@"
