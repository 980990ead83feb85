#!/usr/bin/env bash
# The recipe of the shipped SmolLM2 draft (drafts/smollm2-135m), from scratch, on a CPU:
#   1.     the target writes its alignment set: code completions, its own instructions (Magpie) and prose
#          continuations, in bf16, batched                                  (distill.py generate)
#   2. PT  pretrain a draft on prose + code, its embedding table initialised from the target's (SVD to the
#          draft's width), its head trimmed to the K tokens the target writes most     (pretrain.py)
#   3. FT  fine-tune it on the target's text (sequence-level distillation)  (distill.py train)
#   4. KD  the target writes more answers, keeping its top-16 tokens and log-probs at every token; the draft
#          learns those distributions (TVD, no target pass)      (distill.py generate --store-top-k, train)
#   5. OP  (off by default: it cost acceptance here, README "Results") on-policy distillation: the draft continues
#          the prompts itself and learns the target's distribution on its own text    (distill.py train --on-policy)
#   6.     the benchmark: every task, greedy and T 0.6, 128 new tokens      (bench.py)
# Rerun after a stop: a finished stage is skipped, an unfinished one resumes. To add KD to an older draft (30 Nov),
#   mkdir -p runs/r && cp -r OLD_DRAFT runs/r/ft && OUT=runs/r bash recipe.sh
# Each budget is an environment variable: OUT=runs/big PT_TOKENS=3e7 bash recipe.sh
# The defaults are the shipped draft's budget: about 70 minutes on a 2-core CPU at 2 threads, plus ~12 for the KD
# data (README: "Results"); the
# Gaudi / CUDA user turns the budgets up and adds --device.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

OUT=${OUT:-runs/recipe}
TARGET=${TARGET:-smollm2}
PRESET=${PRESET:-cpu-small}
DEVICE=${DEVICE:-auto}
CODE_PROMPTS=${CODE_PROMPTS:-900}      # def + docstring prompts cut from the stdlib (HumanEval-like completions)
MAGPIE=${MAGPIE:-640}                  # instructions the target writes itself
TEXT_PROMPTS=${TEXT_PROMPTS:-320}      # openings of prose passages (training split) the target continues
TEMPERATURES=${TEMPERATURES:-0.6,0}
GEN_TOKENS=${GEN_TOKENS:-128}
HEAD_VOCAB=${HEAD_VOCAB:-8192}         # the draft predicts the 8k tokens the target writes most (of 49,152)
PT_TOKENS=${PT_TOKENS:-1.5e7}            # the shipped draft's 15M (its card)
FT_EPOCHS=${FT_EPOCHS:-2}                # the shipped draft was fine-tuned for 2 epochs (its card)
FT_LR=${FT_LR:-1e-3}
KD_STEPS=${KD_STEPS:-330}              # steps of 8 rows on the stored top-16 (~2 epochs; 0: no KD stage)
OP_STEPS=${OP_STEPS:-0}                # on-policy steps of 8 rollouts of 96 tokens (0: no OP stage)
OP_LOSS=${OP_LOSS:-tvd}
OP_KD_T=${OP_KD_T:-1}                  # the temperature both distributions are compared at
LIMIT=${LIMIT:-20}                     # benchmark prompts per task
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*"; }
# A training stage is finished when its --json says it ran to its last step ("stopped": null; a run stopped by a
# signal writes it too), or when its folder is a draft with no training state (copied in). An unfinished one with
# a checkpoint continues with --resume (its flags are then the checkpoint's).
finished() { grep -qs '"stopped": null' "$OUT/$1.json" || { [ -f "$OUT/$1/config.json" ] && [ ! -f "$OUT/$1/train_state.pt" ]; }; }
start_or_resume() { if [ -f "$OUT/$1/train_state.pt" ]; then echo --resume "$OUT/$1"; fi; }

if ! finished ft; then
log "1: the target writes the alignment set (resumable)"
python distill.py generate --target "$TARGET" --prompts "code:builtin:code:$CODE_PROMPTS" \
    --temperatures "$TEMPERATURES" --max-new-tokens "$GEN_TOKENS" --batch-size 64 --device "$DEVICE" \
    --seed 11 --out "$OUT/align1" --json "$OUT/align1.json"
python distill.py generate --target "$TARGET" --prompts "magpie:$MAGPIE,text:builtin:prose:$TEXT_PROMPTS" \
    --temperatures "$TEMPERATURES" --max-new-tokens "$GEN_TOKENS" --batch-size 64 --device "$DEVICE" \
    --seed 12 --out "$OUT/align2" --json "$OUT/align2.json"
if ! finished pt; then
    log "2 (PT): pretrain on prose + code, $PT_TOKENS tokens, head of $HEAD_VOCAB tokens (resumable)"
    if [ -f "$OUT/pt/train_state.pt" ]; then PT_ARGS=(--resume "$OUT/pt"); else
        PT_ARGS=(--target "$TARGET" --preset "$PRESET" --init-from-target "$TARGET" --head-vocab "$HEAD_VOCAB"
                 --head-vocab-from "$OUT/align1" --data "builtin:prose=0.5,builtin:code=0.5" --seq-len 256
                 --batch-size 8 --dtype bfloat16); fi
    python pretrain.py "${PT_ARGS[@]}" --max-tokens "$PT_TOKENS" --device "$DEVICE" --out "$OUT/pt" \
        --json "$OUT/pt.json"
fi
log "3 (FT): fine-tune the draft on the target's text (resumable)"
python distill.py train $(start_or_resume ft) --draft "$OUT/pt" --target "$TARGET" --data "$OUT/align1,$OUT/align2" \
    --epochs "$FT_EPOCHS" --lr "$FT_LR" --dtype bfloat16 --device "$DEVICE" --out "$OUT/ft" --json "$OUT/ft.json"
fi
FINAL="$OUT/ft"
if [ "$KD_STEPS" -gt 0 ]; then
    log "4 (KD): the target writes more answers with its top-16 (resumable); the draft learns them (TVD)"
    python distill.py generate --target "$TARGET" --prompts code:builtin:code:160,magpie:128,text:builtin:prose:64 \
        --temperatures 0.6 --max-new-tokens "$GEN_TOKENS" --batch-size 64 --store-top-k 16 --device "$DEVICE" \
        --seed 13 --out "$OUT/kd1"
    python distill.py generate --target "$TARGET" --prompts code:builtin:code:600,magpie:256,text:builtin:prose:200 \
        --temperatures 0.6 --max-new-tokens "$GEN_TOKENS" --batch-size 64 --store-top-k 16 --device "$DEVICE" \
        --seed 14 --out "$OUT/kd2"
    if ! finished kd; then
        python distill.py train $(start_or_resume kd) --draft "$FINAL" --target "$TARGET" --out "$OUT/kd" \
            --data "$OUT/kd1,$OUT/kd2" --loss tvd --max-steps "$KD_STEPS" \
            --batch-size 8 --seq-len 384 --lr 3e-4 --val-fraction 0 --dtype bfloat16 --eval-every 0 --device "$DEVICE" \
            --json "$OUT/kd.json"
    fi
    FINAL="$OUT/kd"
fi
if [ "$OP_STEPS" -gt 0 ]; then
    if ! finished op; then
        log "5 (OP): on-policy distillation, $OP_STEPS steps (resumable)"
        python distill.py train $(start_or_resume op) --draft "$FINAL" --target "$TARGET" --out "$OUT/op" \
            --on-policy "code:builtin:code:$CODE_PROMPTS,magpie:$MAGPIE,text:builtin:prose:$TEXT_PROMPTS" \
            --loss "$OP_LOSS" --kd-temperature "$OP_KD_T" --rollout-tokens 96 --seq-len 384 --batch-size 8 \
            --max-steps "$OP_STEPS" --lr 3e-4 --dtype bfloat16 --eval-every 0 --save-every 50 --device "$DEVICE" \
            --json "$OUT/op.json"
    fi
    FINAL="$OUT/op"
fi
STAGES="FT=$OUT/ft"
[ -f "$OUT/pt/config.json" ] && STAGES="PT=$OUT/pt,$STAGES"
[ "$KD_STEPS" -gt 0 ] && STAGES="$STAGES,KD=$OUT/kd"
[ "$OP_STEPS" -gt 0 ] && STAGES="$STAGES,OP=$OUT/op"
log "6: the benchmark, every stage, every task, greedy and T 0.6"
python bench.py --target "$TARGET" --stages "$STAGES" --gamma 3 --temperature 0,0.6 \
    --limit "$LIMIT" --max-new-tokens 128 --device "$DEVICE" --json "$OUT/bench.json" | tee "$OUT/bench.md"
log "done: $OUT/bench.md; the draft is $FINAL"
