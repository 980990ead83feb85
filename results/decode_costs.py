"""Issue 13 floors, interleaved in one process, 2 threads: AR tok/s fp32 vs bf16; our bf16 loop vs transformers
generate bf16; c_time of a draft step (draft DIR given) vs a SmolLM2 step, bf16; compile of the draft step."""
import copy, json, os, statistics, sys, time
import torch
import checkpoint, speculative, tokenizer
torch.set_num_threads(2)
draft_dir = sys.argv[1]
R = int(sys.argv[2]) if len(sys.argv) > 2 else 5
tok = tokenizer.load_tokenizer("smollm2")
prompt = tok.chat([{"role": "user", "content": "Write a Python function that reverses a string."}])
N = 96
t32 = checkpoint.load_model("smollm2", dtype=torch.float32)
t16 = checkpoint.load_model("smollm2", dtype=torch.bfloat16)
hf16 = checkpoint.load_hf("smollm2", torch.bfloat16)
out = {"fp32": [], "bf16": [], "hf_bf16": []}
def ours(m):
    t0 = time.perf_counter(); ids, st = speculative.autoregressive(m, prompt, N, temperature=0.0, stop_ids=()); return len(ids) / (time.perf_counter() - t0)
def hf(m):
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        y = m.generate(x, max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    return (y.shape[1] - len(prompt)) / (time.perf_counter() - t0)
ours(t32); ours(t16); hf(hf16)
for r in range(R):
    out["fp32"].append(ours(t32)); out["bf16"].append(ours(t16)); out["hf_bf16"].append(hf(hf16))
med = {k: statistics.median(v) for k, v in out.items()}
print("AR tok/s medians", {k: round(v, 1) for k, v in med.items()}, "bf16/fp32", round(med["bf16"] / med["fp32"], 2),
      "ours/hf bf16", round(med["bf16"] / med["hf_bf16"], 2))
# c_time: one draft step vs one target step, both bf16, cache at the prompt's length
d16 = checkpoint.load_model(draft_dir, dtype=torch.bfloat16)
full = copy.deepcopy(d16); full.head_ids = None; full._head_rows = None   # the same draft with its full tied head
def step_time(m, reps=200):
    m.setup_cache(1, 512)
    with torch.no_grad():
        m(torch.tensor([prompt]), input_pos=0)
        x = torch.tensor([[prompt[-1]]])
        ts = []
        for i in range(reps):
            t0 = time.perf_counter(); m(x, input_pos=len(prompt)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts[20:])
res = {}
for r in range(3):
    for name, m in (("target", t16), ("draft_trimmed", d16), ("draft_full_head", full)):
        res.setdefault(name, []).append(step_time(m, 60 if name == "target" else 300))
med2 = {k: statistics.median(v) * 1e3 for k, v in res.items()}
print("step ms", {k: round(v, 3) for k, v in med2.items()}, "c_time trimmed", round(med2["draft_trimmed"] / med2["target"], 4),
      "c_time full head", round(med2["draft_full_head"] / med2["target"], 4))
json.dump({"ar_tok_s": out, "ar_medians": med, "step_ms": med2}, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_costs.json"), "w"), indent=1)
# torch.compile (inductor) of the draft's layers on the CPU, buckets of 64 cache slots: does it pay?
comp = checkpoint.load_model(draft_dir, dtype=torch.bfloat16)
t0 = time.perf_counter(); comp.compile_blocks(64); comp.setup_cache(1, 512)
with torch.no_grad():
    comp(torch.tensor([prompt]), input_pos=0)
    for i in range(3): comp(torch.tensor([[prompt[-1]]]), input_pos=len(prompt) + i)
print("compile warm-up s", round(time.perf_counter() - t0, 1))
eager = checkpoint.load_model(draft_dir, dtype=torch.bfloat16)
cres = {"eager": [], "compiled": []}
for r in range(3):
    cres["eager"].append(step_time(eager, 300)); cres["compiled"].append(step_time(comp, 300))
print("draft step ms eager vs compiled", {k: round(statistics.median(v) * 1e3, 3) for k, v in cres.items()})
# bucketed KV-cache reads (the compiled / Gaudi shape policy) vs exact reads, eager bf16 SmolLM2 decoding
bres = {1: [], 64: []}
for r in range(R):
    for b in (1, 64):
        t16.cache_bucket = b
        bres[b].append(ours(t16))
t16.cache_bucket = 1
print("AR bf16 tok/s exact reads vs buckets of 64", {k: round(statistics.median(v), 1) for k, v in bres.items()})
