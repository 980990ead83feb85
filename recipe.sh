#!/usr/bin/env bash
# The whole FastDraft pipeline at laptop scale, SmolLM2-135M-Instruct as the target:
#   1. PT  pretrain a draft on prose                      (pretrain.py)
#   2. CP  continue on a code + prose mixture             (pretrain.py --init-from)
#   3.     the target writes an alignment set             (distill.py generate)
#   4. FT  fine-tune the draft on it                      (distill.py train)
#   5.     acceptance per task per stage, speedups, plot  (bench.py --stages)
# Each budget below is an environment variable, so a bigger machine can turn them up:
#   OUT=runs/recipe PT_TOKENS=3e6 bash recipe.sh
# The defaults take about 75 minutes on a 2-core CPU (README: "Results").
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

OUT=${OUT:-runs/recipe}
TARGET=${TARGET:-smollm2}
PRESET=${PRESET:-cpu-small}
DEVICE=${DEVICE:-auto}
PT_TOKENS=${PT_TOKENS:-8e5}            # stage 1: prose
CP_TOKENS=${CP_TOKENS:-5e5}            # stage 2: code + prose, 2:1 as in the paper (5B code + 2.5B text)
MAGPIE=${MAGPIE:-96}                   # instructions the target writes itself
CODE_PROMPTS=${CODE_PROMPTS:-96}       # def + docstring prompts cut from the stdlib
TEMPERATURES=${TEMPERATURES:-0.6,1.0,0}
GEN_TOKENS=${GEN_TOKENS:-128}
FT_EPOCHS=${FT_EPOCHS:-3}
FT_LR=${FT_LR:-3e-4}                   # 1e-3 did better for this small draft (README: "Results")
LIMIT=${LIMIT:-10}                     # benchmark prompts per task (stage table)
FINAL_LIMIT=${FINAL_LIMIT:-5}          # prompts per task for the final draft's gamma x temperature grid
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ ! -f "$OUT/pt/config.json" ]; then
    log "stage 1 (PT): pretrain on prose, $PT_TOKENS tokens"
    python pretrain.py --target "$TARGET" --preset "$PRESET" --data builtin:prose --max-tokens "$PT_TOKENS" \
        --device "$DEVICE" --out "$OUT/pt" --json "$OUT/pt.json"
fi
if [ ! -f "$OUT/cp/config.json" ]; then
    log "stage 2 (CP): continue on code + prose, $CP_TOKENS tokens"
    python pretrain.py --target "$TARGET" --init-from "$OUT/pt" --data "builtin:code=0.67,builtin:prose=0.33" \
        --max-tokens "$CP_TOKENS" --device "$DEVICE" --out "$OUT/cp" --json "$OUT/cp.json"
fi
log "stage 3a: the target writes the alignment set (resumable)"
python distill.py generate --target "$TARGET" --prompts "magpie:$MAGPIE,code:builtin:code:$CODE_PROMPTS" \
    --temperatures "$TEMPERATURES" --max-new-tokens "$GEN_TOKENS" --device "$DEVICE" --out "$OUT/synthetic" \
    --json "$OUT/synthetic.json"
if [ ! -f "$OUT/ft/config.json" ]; then
    log "stage 3b (FT): fine-tune the draft on the target's text"
    python distill.py train --draft "$OUT/cp" --target "$TARGET" --data "$OUT/synthetic" --epochs "$FT_EPOCHS" \
        --lr "$FT_LR" --device "$DEVICE" --out "$OUT/ft" --json "$OUT/ft.json"
fi
log "benchmark: acceptance per task per stage (gamma 3, temperature 0.6, the paper's setting)"
python bench.py --target "$TARGET" --stages "PT=$OUT/pt,CP=$OUT/cp,FT=$OUT/ft" --gamma 3 --temperature 0.6 \
    --limit "$LIMIT" --device "$DEVICE" --json "$OUT/stages.json" | tee "$OUT/stages.md"
log "benchmark: the final draft over gamma 1,3,5 and temperatures 0, 0.6"
python bench.py --target "$TARGET" --draft "$OUT/ft" --gamma 1,3,5 --temperature 0,0.6 --limit "$FINAL_LIMIT" \
    --device "$DEVICE" --json "$OUT/final.json" --plot "$OUT/final.png" | tee "$OUT/final.md"
log "done: $OUT/stages.md, $OUT/final.md, $OUT/final.png"
