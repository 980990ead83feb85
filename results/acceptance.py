"""Per-token acceptance of drafts on bench's prompts, no timing (so it may run beside other jobs): issue 23's
ablation. For each draft, task and temperature: alpha = accepted / drafted, beta = accepted / (accepted + rejected
rounds), tau = new tokens per target forward; gamma 3, P 0 (the defaults), both models in bfloat16, seed = prompt.

    python results/acceptance.py --set tune --limit 5 --tokens 96 shipped=drafts/smollm2-135m new=runs/x/ft
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import bench, checkpoint, speculative, tokenizer

p = argparse.ArgumentParser()
p.add_argument("drafts", nargs="+", help="NAME=FOLDER")
p.add_argument("--set", choices=["tune", "report"], default="tune", help="bench's tuning or reported prompts")
p.add_argument("--limit", type=int, default=5)
p.add_argument("--tokens", type=int, default=96)
p.add_argument("--temperatures", default="0,0.6")
p.add_argument("--json", default=None)
a = p.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
tok = tokenizer.load_tokenizer("smollm2")
target = checkpoint.load_model("smollm2", dtype=torch.bfloat16)
pick = bench.tuning_texts if a.set == "tune" else bench.read_task
prompts = {t: bench.task_prompts(t, pick(t, None, a.limit), tok) for t in bench.TASKS}
rows = []
for spec in a.drafts:
    name, folder = spec.split("=", 1)
    draft = checkpoint.load_model(folder, dtype=torch.bfloat16)
    for task in bench.TASKS:
        for T in (float(t) for t in a.temperatures.split(",")):
            tot, t0 = dict(drafted=0, accepted=0, rejections=0, target_forwards=0, new_tokens=0), time.time()
            for i, ids in enumerate(prompts[task]):
                _, st = speculative.generate(target, draft, ids, a.tokens, gamma=3, temperature=T, seed=i,
                                             stop_ids=tok.stop_ids)
                for k in tot:
                    tot[k] += st[k]
            rows.append(dict(draft=name, task=task, T=T, alpha=tot["accepted"] / max(tot["drafted"], 1),
                             beta=tot["accepted"] / max(tot["accepted"] + tot["rejections"], 1),
                             tau=tot["new_tokens"] / max(tot["target_forwards"], 1), **tot,
                             seconds=round(time.time() - t0, 1)))
            print(json.dumps(rows[-1]), flush=True)
print(f"\n| draft | " + " | ".join(f"{t} T{T:g}" for t in bench.TASKS for T in sorted({r['T'] for r in rows})) + " |")
for name in dict.fromkeys(r["draft"] for r in rows):
    print(f"| {name} | " + " | ".join(f"{r['alpha']:.3f}" for r in rows if r["draft"] == name) + " |")
if a.json:
    json.dump(rows, open(a.json, "w"), indent=1)
