"""
Who writes the text the draft learns from: batched generation with a static KV cache.

    generate_dataset(target, tok, prompts="magpie:200,code:builtin:code:200", out="data/synth", target_spec="smollm2")

The target answers every prompt of a data set (synthetic.py: the sources, the folder format) at several
temperatures and greedily, as in the paper, in left-padded batches sharing one static KV cache; `distill.py
generate` is its command line. It also writes instructions itself ("Magpie", Xu et al. 2024: fed only its chat
template's user-turn prefix, it writes a user's request). For on-policy distillation the draft writes instead:
OnPolicyBatches rolls it out on the prompts as it is now, batch by batch, and `distill.py train --on-policy` has
the target score what it wrote. The losses and the training loop are distill.py's and train.py's.
"""

import hashlib
import json
import math
import os
import time

import torch

import synthetic
from common import UserError, mark_step, write_atomic
from speculative import make_generator, sample, sample_probs, sampling_dtype

DEFAULT_TEMPERATURES = (0.6, 0.8, 1.0, 0.0)   # the paper's three temperatures plus greedy
PROMPT_BUCKET = 64   # static shapes (cuda, hpu): prompt lengths are left-padded to a multiple of this


# -----------------------------------------------------------------------------
# batched generation: B prompts of different lengths, one forward a token

def seed_for(seed, key):
    """A seed for one work unit that depends only on (--seed, the unit), not on which rank runs it."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def user_turn_prefix(tok):
    """The token ids a chat template puts before a user's message (incl. a default system turn, if any): the
    common prefix of two different one-message chats."""
    a, b = (tok.chat([{"role": "user", "content": s}], add_generation_prompt=False) for s in ("1", "2"))
    prefix = os.path.commonprefix([a, b])   # (of lists, too)
    if not prefix:
        raise UserError(f"cannot find the user-turn prefix of {tok.spec}'s chat template (needed for magpie)")
    return prefix


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=0.0, top_p=None, stop_ids=(), generator=None,
                   static=False, store_top_k=0):
    """Continue B prompts of different lengths in one batch: left-padded, one static KV cache, per-row stop.
    Left padding lines up every row's last prompt token at one cache slot, so each step is one (B, 1) forward;
    `pad` hides the padding slots and shifts RoPE positions: each row computes exactly what it would alone. Stopped
    rows leave the batch once they are a quarter of it. static (cuda / hpu: a new shape is a new graph): prompts
    padded to a multiple of PROMPT_BUCKET; the batch shrinks only to a power of two, finished rows riding along.
    store_top_k=k > 0: also keep, for every token written, the k most likely tokens of the distribution it was drawn
    from (temperature 1) and their log-probabilities: token-level KD then needs no second pass of the target.
    Returns (completions, stopped, top); a completion includes its stop token (the draft learns end-of-turn too);
    top[b] = (ids, logprobs), one list of k per token of completion b, or None without store_top_k."""
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    L = -(-L // PROMPT_BUCKET) * PROMPT_BUCKET if static else L
    pad = torch.tensor([L - len(p) for p in prompts], device=device)                  # (B,)
    idx = torch.zeros(B, L, dtype=torch.long, device=device)                          # (B, L); 0 = pad, never seen
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    model.setup_cache(B, L + max_new_tokens)
    logits = model.to_vocab(model(idx, input_pos=0, last_n=1, pad=pad)[:, -1])        # (B, V); -inf off a trimmed head
    stop, dtype = set(stop_ids), sampling_dtype(device)
    out, stopped = [[] for _ in range(B)], [False] * B
    top = [([], []) for _ in range(B)] if store_top_k else None
    live = list(range(B))                       # the prompt index of each row still in the batch
    for t in range(max_new_tokens):
        probs = sample_probs(logits, temperature, top_p=top_p)                        # (B', V); one-hot if greedy
        nxt = sample(probs, generator, dtype)                                          # (B',)
        if store_top_k:   # the teacher's distribution, as the KD losses read it (rounded: it is stored as text)
            lp, ix = logits.float().log_softmax(-1).topk(store_top_k, dim=-1)          # (B', k)
            lp, ix = lp.clamp(min=-99).mul(1000).round().div(1000).tolist(), ix.tolist()
        for i, (b, tok) in enumerate(zip(live, nxt.tolist())):
            if not stopped[b]:
                out[b].append(tok)
                stopped[b] = tok in stop
                if store_top_k:
                    top[b][0].append(ix[i])
                    top[b][1].append(lp[i])
        if all(stopped) or t == max_new_tokens - 1:
            break
        keep = [i for i, b in enumerate(live) if not stopped[b]]
        if static:
            size = 1 << (len(keep) - 1).bit_length()
            keep = sorted(keep + [i for i, b in enumerate(live) if stopped[b]][:size - len(keep)])
        if len(keep) < len(live) and (static or len(live) - len(keep) >= max(1, len(live) // 4)):
            # rows are done: drop them (one cache copy) instead of decoding them on and on
            model.keep_cache_rows(keep, L + t)
            live, nxt, pad = [live[i] for i in keep], nxt[keep], pad[keep]
        logits = model.to_vocab(model(nxt[:, None], input_pos=L + t, pad=pad)[:, -1])  # (B', V)
        mark_step(device)   # Habana lazy mode: one graph per token
    model.clear_cache()
    return out, stopped, top


# -----------------------------------------------------------------------------
# the target writes: its own instructions (Magpie), then the alignment data set, unit by unit

def magpie_instructions(target, tok, out, c, n, seed, max_tokens, static):
    """Magpie (Xu et al. 2024): fed only the user-turn prefix, the target writes n user instructions itself.
    Batch c's are kept on disk, so a rerun answers the same ones. Returns them as chat prompts (source "magpie");
    an unfinished or empty one is left out."""
    path = os.path.join(out, f"magpie-c{c:05d}.jsonl")
    if not os.path.exists(path):
        g = make_generator(next(target.parameters()).device, seed_for(seed, f"magpie-{c}"))
        outs, stopped, _ = generate_batch(target, [user_turn_prefix(tok)] * n, max_tokens, 1.0, None, tok.stop_ids, g,
                                          static)
        texts = [tok.decode([i for i in ids if i not in tok.stop_ids]).strip() for ids in outs]
        write_atomic(path, synthetic.jsonl({"instruction": t if ok else ""} for t, ok in zip(texts, stopped)))
    return [{"text": row["instruction"], "source": "magpie", "kind": "chat"}
            for _, row in synthetic.json_lines(path, "corrupt magpie line") if row["instruction"]]


def generate_dataset(target, tok, *, prompts, out, target_spec, temperatures=DEFAULT_TEMPERATURES, batch_size=16,
                     max_new_tokens=256, max_prompt_tokens=512, top_p=None, seed=0, field="instruction", limit=0,
                     magpie_max_tokens=128, store_top_k=0, rank=None, world_size=None, log=print):
    """The target answers every prompt at every temperature; this rank does its share of the work units. A work
    unit is (a batch of length-sorted prompts, one temperature); unit i of the fixed prompts belongs to rank
    i % world_size. Magpie batches are written and answered by rank (batch % world_size): no rank can see another's
    instructions before they exist. Returns the manifest."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank   # torchrun's; generation needs no process group
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(t < 0 for t in temperatures):
        raise UserError("--temperatures must be numbers >= 0 (0 = greedy)")
    settings = {"target": target_spec, "prompts": prompts, "temperatures": temperatures, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size,
                "seed": seed, "field": field, "limit": limit, "magpie_max_tokens": magpie_max_tokens,
                **({"store_top_k": store_top_k} if store_top_k else {})}
    fixed, n_magpie, counts = synthetic.prepare_prompts(tok, prompts, field, limit, max_prompt_tokens)
    if max_prompt_tokens + max_new_tokens > target.config.max_seq_len:
        raise UserError(f"--max-prompt-tokens + --max-new-tokens = {max_prompt_tokens + max_new_tokens} is over the "
                        f"target's context ({target.config.max_seq_len})")
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
    old = synthetic.read_manifest(out)
    if old and old.get("settings") != settings:
        changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        raise UserError(f"{out} was generated with other settings ({', '.join(changed)}); use a new --out")
    # a unit is (name, fixed batch index or ("m", magpie batch index), temperature); 0.6 -> "t0.6", 0.0 -> "t0"
    units = [(f"p{c:05d}-t{t:g}", c, t) for c in range(len(batches)) for t in temperatures]
    n_magpie_batches = math.ceil(n_magpie / batch_size)
    counts["units_total"] = len(units) + n_magpie_batches * len(temperatures)
    mine = [u for i, u in enumerate(units) if i % world_size == rank]
    mine += [(f"m{c:05d}-t{t:g}", ("m", c), t) for c in range(n_magpie_batches) if c % world_size == rank
             for t in temperatures]

    done, shard_stats, seen_pairs = synthetic.finished_work(out)
    todo = [u for u in mine if u[0] not in done]
    log(f"rank {rank}: {len(mine)} work units, {len(mine) - len(todo)} already done")
    tok_info = {"spec": tok.spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size}
    synthetic.write_manifest(out, settings, tok_info, counts, rank, shard_stats)

    device = next(target.parameters()).device
    static = device.type in ("cuda", "hpu")
    t0, new_tokens = time.time(), 0
    for n, (key, c, temperature) in enumerate(todo):
        if isinstance(c, tuple):   # a magpie batch: its instructions first
            magpie = magpie_instructions(target, tok, out, c[1], min(batch_size, n_magpie - c[1] * batch_size), seed,
                                         magpie_max_tokens, static)
            batch = synthetic.keep_prompts(tok, magpie, max_prompt_tokens)[0]
        else:
            batch = batches[c]
        rows, dups = [], 0
        if batch:
            outs, stopped, top = generate_batch(target, [p["ids"] for p in batch], max_new_tokens, temperature,
                                                top_p, tok.stop_ids, make_generator(device, seed_for(seed, key)),
                                                static, store_top_k)
            rows, dups = synthetic.answer_rows(tok, batch, outs, stopped, temperature, key, seen_pairs, top)
        name = f"shard-r{rank}-{key}.jsonl"
        write_atomic(os.path.join(out, name), synthetic.jsonl(rows))
        shard_stats[name] = synthetic.shard_stats_of(rows)
        new_tokens += shard_stats[name][1]
        synthetic.write_manifest(out, settings, tok_info, {}, rank, shard_stats, dups={key: dups})
        log(f"rank {rank}: unit {n + 1}/{len(todo)} {key}: {len(rows)} rows, {dups} duplicates, "
            f"{new_tokens / max(time.time() - t0, 1e-9):.1f} tok/s")
    return synthetic.write_manifest(out, settings, tok_info, {}, rank, shard_stats)


# -----------------------------------------------------------------------------
# on-policy data: the draft writes, the target scores what it wrote

class OnPolicyBatches(synthetic.CompletionBatches):
    """Endless batches of the draft's own continuations of the prompts, sampled from the draft as it is now
    (on-policy distillation: DistillSpec, Zhou et al. 2023, arXiv 2310.08461; GKD, Agarwal et al. 2024). A
    target-written data set shows the draft only the target's text; in decoding the draft continues its *own*
    proposals, and where those leave the target's text it has never been taught. Here the loss (a token-level one:
    the target's distribution at each position of the draft's text against the draft's) is taken exactly there.
    Rows are (x, y) as in CompletionBatches, y the draft's tokens and IGNORE on the prompt. Batch n samples at
    temperatures[n % len] with a seed made of (seed, rank, n), so a resumed run (same weights, same n) rolls out
    the very batches an uninterrupted one would have."""

    def __init__(self, draft, prompts, batch_size, *, max_new_tokens, temperatures, stop_ids, seq_len, seed=0,
                 rank=0, world_size=1, device="cpu", length=None):
        super().__init__(prompts, batch_size, seed, rank, world_size, device, length)
        self.draft, self.max_new_tokens, self.temperatures = draft, max_new_tokens, temperatures
        self.stop_ids, self.seq_len, self.n = stop_ids, seq_len, 0

    def __next__(self):
        prompts = self.take()
        temperature = self.temperatures[self.n % len(self.temperatures)]
        g = make_generator(self.device, seed_for(self.seed, f"rollout-{self.rank}-{self.n}"))
        self.n += 1
        outs, _, _ = generate_batch(self.draft, prompts, self.max_new_tokens, temperature, None, self.stop_ids, g,
                                    static=self.length is not None)
        rows = [synthetic.completion_row(p, c, self.seq_len) for p, c in zip(prompts, outs)]
        return synthetic.pad_rows(rows, self.device, self.length)

    def state_dict(self):
        return {**super().state_dict(), "n": self.n}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.n = int(sd["n"])


def rollout_prompts(target, tok, sources, out, seed, max_prompt_tokens, batch_size=64, magpie_max_tokens=128,
                    log=print):
    """The prompt ids of --on-policy SOURCES (generate's --prompts syntax; evaluation prompts refused). magpie:N
    instructions are written by the target once, batch_size at a time, and kept in `out`, so a resumed run rolls
    out the same prompts."""
    fixed, n_magpie, counts = synthetic.prepare_prompts(tok, sources, "instruction", 0, max_prompt_tokens)
    os.makedirs(out, exist_ok=True)
    static = next(target.parameters()).device.type in ("cuda", "hpu")
    magpie = [p for c in range(math.ceil(n_magpie / batch_size))
              for p in magpie_instructions(target, tok, out, c, min(batch_size, n_magpie - c * batch_size), seed,
                                           magpie_max_tokens, static)]
    magpie = synthetic.keep_prompts(tok, magpie, max_prompt_tokens)[0]
    prompts = [p["ids"] for p in fixed + magpie]
    if not prompts:
        raise UserError(f"--on-policy {sources}: no prompts left once evaluation prompts, repeats and over-long "
                        f"prompts are dropped")
    log(f"on-policy prompts: {len(prompts)} ({dict(counts['prompts_by_source'])}, magpie {len(magpie)})")
    return prompts


