#!/usr/bin/env bash
# The general drafter shipped in cosine/drafters/weights/ and the feature drafter's data curve:
# `cosine distill` on the built-in general mix plus prompts the target writes itself, both kinds
# from one set of target labels (the work directory's data is shared; each run has its own
# checkpoint). The evaluation sets are excluded (--exclude): no built-in prompt uses a word of
# theirs and no target-written prompt shares five words in a row with one of them.
#
#   bash bench/distill_general.sh OUT_DIR [DEVICE] [extra `cosine distill` options...]
#
# OUT_DIR/general-small: the small drafter (the shipped kind); OUT_DIR/general-feature: the feature
# drafter on all the data. CURVE_TOKENS="250000 1000000 ..." adds feature drafters trained on
# random subsets of that many tokens (OUT_DIR/feature-<tokens>), each for CURVE_STEPS steps (the
# same compute for every point, the subset repeating as needed); DEADLINE (seconds since the
# script started) skips what would start after it.
#
# DEVICE: cuda (one H100/H200: minutes) or cpu (the same budget takes days; lower it with e.g.
# --text-tokens 500000 --chat-prompts 300 --sampled-prompts 700). Extra options override the
# budget below.
set -euo pipefail
out=${1:?usage: distill_general.sh OUT_DIR [DEVICE] [options]}
device=${2:-cuda}
shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")" && pwd)
work=${COSINE_DISTILL_WORK:-$HOME/.cache/cosine/distill/general}
python=${PYTHON:-python}
began=$SECONDS
deadline=${DEADLINE:-0}
data=(--device "$device" --seed 0 --exclude "$here/prompts.jsonl" --exclude "$here/prompts_holdout.jsonl"
      --text-tokens 6000000 --vocab-corpus-tokens 6000000 --chat-prompts 4096 --sampled-prompts 12288
      --answer-tokens 160 --seq-len 256 --vocab 8192 --label-batch 128 --generation-batch 1024)
late() { [[ $deadline -gt 0 && $(( SECONDS - began )) -gt $deadline ]]; }
mkdir -p "$work"
"$python" -m cosine.cli distill --kind small --layers 2 --epochs 6 --batch-size 64 --work "$work" --out "$out/general-small" "${data[@]}" "$@"
for tokens in all ${CURVE_TOKENS:-}; do
    if late; then echo "deadline: feature-$tokens skipped"; continue; fi
    if [[ $tokens == all ]]; then name=general-feature; subset=(); else name=feature-$tokens; subset=(--train-tokens "$tokens"); fi
    point="$work-$name"; mkdir -p "$point"; ln -sfn "$work/data" "$point/data"
    steps=(--epochs 3); [[ -n ${CURVE_TOKENS:-} ]] && steps=(--steps "${CURVE_STEPS:-1000}")
    "$python" -m cosine.cli distill --kind feature --unroll 3 --batch-size 64 "${steps[@]}" "${subset[@]}" --work "$point" --out "$out/$name" "${data[@]}" "$@"
done
