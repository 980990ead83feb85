#!/usr/bin/env bash
# Issue 23's ablation: each lever applied to the shipped draft (drafts/smollm2-135m, ~2 CPU-hours to make) for
# a comparable CPU budget (0.26-0.38 CPU-hours, one thread each, two arms at a time), then per-token acceptance
# on bench's tuning prompts (10 a task, disjoint from the reported ones). Run from the repository root:
#   bash results/ablation_23/run.sh      (about 2 hours of a 2-core CPU)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
OUT=${OUT:-runs/ablation_23}
mkdir -p "$OUT"
PROMPTS="code:builtin:code:900,magpie:640,text:builtin:prose:320"   # recipe.sh's alignment prompts
arm() {   # arm NAME STEPS FLAGS...: fine-tune the shipped draft; CPU seconds in NAME.time
    local name=$1 steps=$2; shift 2
    /usr/bin/time -f "%U user %S sys %e wall" -o "$OUT/$name.time" \
    python distill.py train --draft drafts/smollm2-135m --max-steps "$steps" --batch-size 8 --seq-len 384 \
        --lr 3e-4 --dtype bfloat16 --log-every 10 --eval-every 0 --save-every 50 --out "$OUT/$name" \
        --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
}
# on-policy: the draft writes 96 tokens a prompt, the target scores them (greedy and T 0.6 batches in turn)
arm op_tvd 300 --on-policy "$PROMPTS" --loss tvd --rollout-tokens 96 &
arm op_kl 300 --on-policy "$PROMPTS" --loss kl --rollout-tokens 96
wait
arm op_tvd_t06 300 --on-policy "$PROMPTS" --loss tvd --kd-temperature 0.6 --rollout-tokens 96 &
# more target-written data (T 0.6), with the target's top-16 stored at every token
gen() { /usr/bin/time -f "%U user %S sys %e wall" -o "$OUT/$1.time" python distill.py generate --target smollm2 \
        --prompts "$2" --temperatures 0.6 --max-new-tokens 128 --batch-size 64 --seed "$3" --store-top-k 16 \
        --out "$OUT/$1" > "$OUT/$1.log" 2>&1; }
gen gen16 code:builtin:code:160,magpie:128,text:builtin:prose:64 13
gen gen16b code:builtin:code:600,magpie:256,text:builtin:prose:200 14
arm kd_topk 330 --data "$OUT/gen16,$OUT/gen16b" --loss tvd --val-fraction 0   # stored top-16: no target pass
arm ce_more 330 --data "$OUT/gen16,$OUT/gen16b" --loss ce --val-fraction 0    # sequence-level KD, as FT
wait
python results/acceptance.py --set tune --limit 10 --tokens 96 shipped=drafts/smollm2-135m \
    op_tvd="$OUT/op_tvd" kd_topk="$OUT/kd_topk" ce_more="$OUT/ce_more" --json "$OUT/eval2a.json" &
python results/acceptance.py --set tune --limit 10 --tokens 96 op_tvd_t06="$OUT/op_tvd_t06" op_kl="$OUT/op_kl" \
    --json "$OUT/eval2b.json"
wait
