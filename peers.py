"""
The runtimes people deploy drafts in, as bench.py's peers: Hugging Face transformers' assisted generation
(`--peer hf`) and llama.cpp's speculative decoding (`--peer llama.cpp`), each run on the same prompts as our loop.
"""
import glob
import itertools
import os
import re
import shutil
import subprocess

import torch

import checkpoint
import common
from common import UserError


def _ratio(a, b):
    return a / b if a is not None and b else None


# -----------------------------------------------------------------------------
# Hugging Face assisted generation, the peer we compare our tokens/s with (--peer hf)

def hf_assisted(hf_target, hf_draft, ids, args, gamma, threshold, temperature, seed, stop_ids, device):
    """One prompt through transformers' assisted generation with a constant lookahead gamma -> (new tokens, seconds)."""
    # The assistant's own generation config drives drafting: the same gamma, HF's confidence exit only with P > 0
    hf_draft.generation_config.num_assistant_tokens = gamma
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = threshold
    x = torch.tensor([ids], dtype=torch.long, device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0) \
        if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    out, seconds = common.timed(lambda: hf_target.generate(
        x, attention_mask=torch.ones_like(x), assistant_model=hf_draft, max_new_tokens=args.max_new_tokens,
        min_new_tokens=0, eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0],
        num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", **sampling), device)
    return out.shape[1] - x.shape[1], seconds


# -----------------------------------------------------------------------------
# llama.cpp, the CPU runtime people serve with (--peer llama.cpp): its speculative decoding with our
# draft, against llama.cpp alone, on the same prompts (as text: llama.cpp tokenizes them again), greedy

def llama_cpp_binaries(where):
    """(llama-speculative-simple, llama-completion) from --llama-cpp (a folder or one of them) or PATH;
    None if absent. Not llama-speculative: that demo always drafts gamma tokens (no threshold)."""
    folder = os.path.dirname(where) if where and os.path.isfile(where) else where
    found = [shutil.which(name, path=folder) if folder else shutil.which(name)
             for name in ("llama-speculative-simple", "llama-completion")]
    return tuple(found) if all(found) else None


def llama_cpp_models(target_spec, draft_spec, folder):
    """The pair as F16 GGUFs in folder (llama.cpp crashes on SmolLM2's packaged Q4_1): the draft with
    export.py's full head, both with the target's tokenizer metadata; None if the target has no GGUF."""
    path = checkpoint.resolve_spec(target_spec)
    ggufs = [path] if path.endswith(".gguf") else sorted(glob.glob(os.path.join(path, "*.gguf")))
    if not ggufs:
        return None
    fields = checkpoint.gguf_tokenizer_fields(ggufs[0])
    out = []
    for name, spec in (("target", target_spec), ("draft", draft_spec)):
        m = checkpoint.load_model(spec)
        fill = checkpoint.read_head_fill(spec) if os.path.isdir(spec) else None
        out.append(os.path.join(folder, name + ".gguf"))
        checkpoint.save_gguf(checkpoint.full_head(m, fill), out[-1], fields, "f16")
    return out


def run_llama_cpp(binary, models, text, args, gamma=None, threshold=0.0):
    """One greedy generation -> {new_tokens, seconds (decoding only), drafted, accepted}."""
    cmd = [binary, "-m", models[0], "-p", text, "-n", str(args.max_new_tokens), "--temp", "0",
           "-c", "2048", "-t", str(torch.get_num_threads())]
    if gamma is None:
        cmd += ["-no-cnv", "--no-display-prompt"]
    else:
        cmd += ["-md", models[1], "--spec-type", "draft-simple", "--spec-draft-n-max", str(gamma),
                "--spec-draft-p-min", str(threshold)]  # its p is over the draft's top 10 tokens, renormalized
    run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    log = run.stderr + run.stdout

    def number(pattern):
        found = re.search(pattern, log)
        return float(found.group(1)) if found else None
    if gamma is None:  # the first new token comes out of the prompt's forward: "N runs" are the rest
        ms = number(r"(?<!prompt) eval time =\s*([\d.]+) ms")
        rec = {"new_tokens": number(r"(?<!prompt) eval time =.*?/\s*(\d+) runs"),
               "seconds": None if ms is None else ms / 1000}
    else:
        rec = {"new_tokens": number(r"decoded\s+(\d+) tokens"),
               "seconds": number(r"decoded.*? in\s+([\d.]+) sec"),
               "drafted": number(r"n_drafted\s*=\s*(\d+)"), "accepted": number(r"n_accept\s*=\s*(\d+)")}
    if run.returncode != 0 or None in rec.values():
        raise UserError(f"{os.path.basename(binary)} failed (exit {run.returncode}): {log.strip()[-200:]}")
    return rec


def llama_cpp_peer(binaries, models, prompts, tok, args):
    """Per task x gamma x draft threshold: llama.cpp alone and with the draft, interleaved prompt by prompt ->
    rows with acceptance and tokens/s of both, and the speedup."""
    rows = []
    for (task, task_ids), gamma, threshold in itertools.product(prompts.items(), args.gamma, args.draft_threshold):
        plain, spec = [], []
        for ids in task_ids:
            text = tok.decode(ids)
            plain.append(run_llama_cpp(binaries[1], models, text, args))
            spec.append(run_llama_cpp(binaries[0], models, text, args, gamma, threshold))
        tot = {k: sum(r[k] for r in spec) for k in spec[0]}
        plain_tps = _ratio(sum(r["new_tokens"] for r in plain), sum(r["seconds"] for r in plain))
        tps = _ratio(tot["new_tokens"], tot["seconds"])
        rows.append({"task": task, "gamma": gamma, "draft_threshold": threshold, "n_prompts": len(task_ids),
                     "acceptance_rate": _ratio(tot["accepted"], tot["drafted"]), "drafted": tot["drafted"],
                     "accepted": tot["accepted"], "tokens_per_second_plain": plain_tps,
                     "tokens_per_second": tps, "speedup": _ratio(tps, plain_tps)})
    return rows
