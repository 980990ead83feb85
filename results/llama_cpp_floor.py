"""Our decoding loops against llama.cpp's plain decoding (README, "Against llama.cpp's plain decoding"): README's
chat prompt, greedy, 96 tokens, interleaved in one process, medians of REPS, decode-only tokens/s on both sides.
  python export.py --model smollm2 --formats gguf --out OUT/t; python export.py --draft drafts/smollm2-135m --out OUT/d
  python results/llama_cpp_floor.py THREADS REPS LLAMA_CPP_BIN_DIR OUT/t/model.gguf OUT/d/draft.gguf"""
import copy, os, statistics, sys, types
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import checkpoint, model, peers, speculative as S, tokenizer
THREADS, REPS, N = int(sys.argv[1]), int(sys.argv[2]), 96
torch.set_num_threads(THREADS)
BIN = os.path.join(sys.argv[3], "")
MODELS = sys.argv[4:6]
tok = tokenizer.load_tokenizer("smollm2")
ids = tok.chat([{"role": "user", "content": "Write a Python function that reverses a string."}])
t32 = checkpoint.load_model("smollm2")
t16 = copy.deepcopy(t32).to(torch.bfloat16)
t16p = model.prepack_for_cpu(copy.deepcopy(t16))
d16 = checkpoint.load_model(checkpoint.default_draft("smollm2"), dtype=torch.bfloat16)
d16p = model.prepack_for_cpu(copy.deepcopy(d16))
d32 = checkpoint.load_model(checkpoint.default_draft("smollm2"), dtype=torch.float32)
args = types.SimpleNamespace(max_new_tokens=N)
text = tok.decode(ids)
kw = dict(temperature=0.0, stop_ids=set())  # no stop: always N tokens
def ours(fn):
    _, st = fn()
    return st["new_tokens"] / (st["seconds"] - st["prefill_seconds"]), st.get("acceptance_rate")
runs = {
    "llama.cpp plain F16": lambda: (lambda r: (r["new_tokens"] / r["seconds"], None))(peers.run_llama_cpp(BIN + "llama-completion", MODELS, text, args)),
    "llama.cpp + draft F16 P0": lambda: (lambda r: (r["new_tokens"] / r["seconds"], r["accepted"] / r["drafted"]))(peers.run_llama_cpp(BIN + "llama-speculative-simple", MODELS, text, args, 3, 0.0)),
    "ours AR fp32": lambda: ours(lambda: S.autoregressive(t32, ids, N, **kw)),
    "ours AR bf16": lambda: ours(lambda: S.autoregressive(t16, ids, N, **kw)),
    "ours AR bf16 prepack": lambda: ours(lambda: S.autoregressive(t16p, ids, N, **kw)),
    "ours SD fp32 P0.3": lambda: ours(lambda: S.generate(t32, d32, ids, N, gamma=3, draft_threshold=0.3, **kw)),
    "ours SD bf16 P0.3": lambda: ours(lambda: S.generate(t16, d16, ids, N, gamma=3, draft_threshold=0.3, **kw)),
    "ours SD bf16 prepack P0.3": lambda: ours(lambda: S.generate(t16p, d16p, ids, N, gamma=3, draft_threshold=0.3, **kw)),
    "ours SD bf16 prepack P0": lambda: ours(lambda: S.generate(t16p, d16p, ids, N, gamma=3, draft_threshold=0.0, **kw)),
    "ours SD bf16 prepack P0 gamma 2": lambda: ours(lambda: S.generate(t16p, d16p, ids, N, gamma=2, **kw)),
    "llama.cpp + draft F16 P0 gamma 2": lambda: (lambda r: (r["new_tokens"] / r["seconds"], r["accepted"] / r["drafted"]))(peers.run_llama_cpp(BIN + "llama-speculative-simple", MODELS, text, args, 2, 0.0)),
}
for f in runs.values():  # warm-up
    f()
res = {k: [] for k in runs}
for _ in range(REPS):
    for k, f in runs.items():
        res[k].append(f())
base = statistics.median(r[0] for r in res["llama.cpp plain F16"])
print(f"{THREADS} threads, {REPS} reps, {N} tokens, greedy; tok/s decode-only (median), ratio to llama.cpp plain")
for k, rs in res.items():
    tps = statistics.median(r[0] for r in rs)
    acc = rs[0][1]
    print(f"| {k} | {tps:.1f} | {tps / base:.2f}x | {'' if acc is None else f'{acc:.3f}'} |")
