#!/usr/bin/env bash
# The domain experts shipped in cosine/drafters/weights/ (code, chat, math) and the union drafter
# they are compared with (bench/experts.py): each expert is the shipped general drafter adapted by
# `cosine distill --init` on its own domain's data (--domain: prompts the target answers, plus
# the domain's text sources); the union drafter is the same general drafter adapted on all three
# experts' labelled data together, for as many steps as the three experts took together (the same
# total tokens). The evaluation sets are excluded (--exclude) as for the general drafter.
#
#   bash bench/distill_experts.sh OUT_DIR [DEVICE] [extra `cosine distill` options...]
#
# Sized for this 2-core CPU (about an hour in all); on a GPU raise --chat-prompts and --text-tokens.
set -euo pipefail
out=${1:?usage: distill_experts.sh OUT_DIR [DEVICE] [options]}
device=${2:-cpu}
shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${COSINE_DISTILL_WORK:-$HOME/.cache/cosine/distill}
python=${PYTHON:-python}
general="$root/cosine/drafters/weights/general-small"
steps=${EXPERT_STEPS:-120}
common=(--kind small --layers 2 --init "$general" --device "$device" --seed 0 --dtype int8 --batch-size 16
        --exclude "$here/prompts.jsonl" --exclude "$here/prompts_holdout.jsonl"
        --answer-tokens 160 --seq-len 256 --generation-batch 32 --label-batch 16 --lr 3e-4)
for domain in code chat math; do
    text=40000; [[ $domain == math ]] && text=0
    "$python" -m cosine.cli distill --domain "$domain" --chat-prompts ${PROMPTS:-320} --text-tokens $text --steps "$steps" \
        --work "$cache/expert-$domain" --out "$out/$domain-small" "${common[@]}" "$@"
done
"$python" -m cosine.cli distill --steps $(( 3 * steps )) --work "$cache/expert-union" --out "$out/union-small" \
    --union-of "$cache/expert-code" --union-of "$cache/expert-chat" --union-of "$cache/expert-math" "${common[@]}" "$@"
