"""
Speculative decoding, by hand: a small draft model proposes gamma tokens, the target scores them all in one
forward pass, and exact rejection sampling keeps or replaces them so that the output is distributed exactly as
if the target had sampled alone (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling", Algorithm 2).

Run: python speculative.py --draft smollm2 --compare     (the target as its own draft: acceptance 1.0)
"""

import argparse
import codecs
import copy
import json
import os
import statistics
import sys
import time

import torch

import checkpoint
import common
import model
import tokenizer

# -----------------------------------------------------------------------------
# 1. sampling: the ONE filter both models go through

def sample_probs(logits, temperature, top_k=None, top_p=None):
    """Logits (..., V) -> the float32 probabilities (..., V) a token is sampled from; temperature 0: greedy, one-hot.
    Speculative sampling is exact only if q is *exactly* what the draft sampled from and p the target's under the
    same filters, so both models go through this one function (raw softmax would inflate acceptance by 1/Z)."""
    logits = logits.float()
    if temperature == 0:  # greedy is the special case of sampling where all mass sits on the argmax
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. A token is dropped if
        # the tokens ranked above it already reach top_p, so the most likely token always survives.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generator(device, seed=None):
    """The torch.Generator of one run (seeded: reproducible), on the models' device; on the CPU for Gaudi, whose
    bridge has no device generators (HabanaAI/vllm-fork issues 183, 754): uniform() draws there and moves."""
    generator = torch.Generator(device="cpu" if torch.device(device).type == "hpu" else device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sampling_dtype(device):
    """float64 for the cumulative sums and uniforms of sample / verify, float32 where the device has no float64
    (Gaudi, Apple's Metal). float32 resolves a probability to ~2^-24; zero-probability tokens are still never
    drawn or accepted and greedy is still exact (the tests run both)."""
    return torch.float64 if common.has_float64(device) else torch.float32


def uniform(shape, generator, device, dtype):
    """Numbers uniform in (0, 1], drawn on the generator's device and moved to `device` (make_generator)."""
    where = device if generator is None else generator.device
    return (1.0 - torch.rand(shape, dtype=dtype, generator=generator, device=where)).to(device)


def sample(probs, generator=None, dtype=torch.float64):
    """One token id per row of (..., V) non-negative weights (need not sum to 1), without a host sync.

    Inverse transform sampling: with v uniform in (0, total], token i is the first whose cumulative weight reaches
    v, so a zero-weight token (an empty interval) is never drawn. float64 where the device has it: over a 100k
    vocabulary, float32 rounding is as large as small tokens' probabilities. (torch.multinomial or an exponential
    race cost ~10x more on CPU.)"""
    cdf = probs.to(dtype).cumsum(-1)  # (..., V)
    u = uniform(cdf.shape[:-1] + (1,), generator, probs.device, dtype)
    return torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)  # u * total <= total: never past the end


# -----------------------------------------------------------------------------
# 2. verify: exact rejection sampling

def verify(draft_tokens, q, p, generator=None, dtype=torch.float64, on_device=False):
    """Accept or reject the draft's gamma tokens; returns (n_accepted, next_token) as Python ints (on_device:
    0-dim tensors, which the decoding loop reads together with the round's tokens).

    Leviathan et al. 2023, Algorithm 1 (Chen et al. 2023, Algorithm 2):
      draft_tokens (gamma,)    x_1..x_gamma, x_i ~ q_i
      q            (gamma, V)  the draft's distributions, exactly as sampled from (after the filters)
      p            (gamma+1, V) the target's distributions at the same positions, plus one more for the bonus
    For i = 1..gamma: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); stop at the first rejection and
    emit a token from norm(max(0, p_i - q_i)); if all gamma are accepted emit a bonus token from p_{gamma+1}.
    The emitted tokens are distributed exactly as sampling from p alone (Chen et al., Theorem 1).
    """
    gamma, V = q.shape
    x = draft_tokens.view(gamma, 1)
    qx = q.gather(1, x).squeeze(1)  # (gamma,) q_i(x_i) > 0: the draft sampled x_i from q_i
    px = p[:gamma].gather(1, x).squeeze(1)  # (gamma,) p_i(x_i), may be 0
    # r ~ U(0, 1], and "r <= p/q" written as "r * q <= p": no division, so greedy (one-hot p and q) is exact:
    # p(x) = 0 is always rejected (r > 0), and p(x) >= q(x) always accepted (r * q <= q even after rounding).
    r = uniform(gamma, generator, q.device, dtype)  # (gamma,)
    accept = r * qx <= px  # (gamma,)
    n = accept.long().cumprod(0).sum()  # () number of leading acceptances, stays on the device

    # The token after the n accepted ones comes from norm(max(0, p_n - q_n)). Padding q with an all-zero row
    # makes the bonus the same formula: the residual of p_{gamma+1} against a draft that proposed nothing is
    # p_{gamma+1} itself. So one code path, and no branch on n (which would need a host sync).
    q_pad = torch.cat([q, q.new_zeros(1, V)])  # (gamma+1, V)
    p_n = p.index_select(0, n.view(1))[0]  # (V,)
    residual = (p_n - q_pad.index_select(0, n.view(1))[0]).clamp_(min=0.0)  # (V,)
    # An all-zero residual means p_n <= q_n everywhere, i.e. p_n == q_n, where acceptance was certain and this
    # row is never reached in exact arithmetic; float rounding can still get here, and then p_n is the answer.
    residual = torch.where(residual.sum() > 0, residual, p_n)
    next_token = sample(residual, generator, dtype)
    if on_device:
        return n, next_token
    n_accepted, next_token = torch.stack([n, next_token]).tolist()  # the one host sync of a round
    return n_accepted, next_token


# -----------------------------------------------------------------------------
# 3. the decoding loops: plain, then speculative; the helpers they share come after them

@torch.no_grad()
def autoregressive(target, prompt_ids, max_new_tokens, temperature=0.6, top_k=None, top_p=None, seed=None,
                   stop_ids=None, on_token=None, dtype=None):
    """The baseline: one target forward per new token, same sampling filter -> (new_ids, stats). Stops after
    max_new_tokens, or right after a token in stop_ids (included). on_token(token_id) sees each new token."""
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    tokens, t0, prefill_seconds = _start([target], prompt_ids, max_new_tokens)  # (1, prompt + max_new)
    generator, dtype = make_generator(tokens.device, seed), dtype or sampling_dtype(tokens.device)
    stop_ids, new_ids, n = set(stop_ids or ()), [], len(prompt_ids)
    while len(new_ids) < max_new_tokens:
        logits = target.to_vocab(target(tokens[:, n - 1:n], input_pos=n - 1))  # (1, 1, V)
        tokens[0, n] = sample(sample_probs(logits[0, -1], temperature, top_k, top_p), generator, dtype)
        new_ids.append(tokens[0, n].item())  # a step's one host sync (in Gaudi's lazy mode: ends its graph)
        n += 1
        if on_token is not None:
            on_token(new_ids[-1])
        if new_ids[-1] in stop_ids:
            break
    rounds = [(0, 0, 0)] * len(new_ids)  # (drafted, accepted, draft forwards) of each target forward
    return new_ids, _stats(rounds, 0, len(new_ids), t0, prefill_seconds, tokens.device)


@torch.no_grad()
def generate(target, draft, prompt_ids, max_new_tokens, gamma=3, temperature=0.6, top_k=None, top_p=None,
             seed=None, stop_ids=None, on_tokens=None, draft_threshold=0.0, dtype=None):
    """Speculative sampling with static KV caches (Leviathan et al. 2023, Algorithm 1, looped) -> (new_ids, stats),
    new_ids distributed exactly as autoregressive(target, ...) would sample them.

    on_tokens(tokens, n_from_draft) gets each round's new tokens, the first n_from_draft accepted drafts. Stops at
    max_new_tokens, or right after a token in stop_ids (included), even a draft. draft_threshold > 0 stops a round's
    drafting where the draft's top probability is below it (HF's assistant_confidence_threshold, llama.cpp's p_min):
    it looks only at the draft, so it stays exact. draft may be target itself: one shared KV cache, correct since
    both write the same keys and values at the same positions. dtype: of the sampling sums (None: the device's)."""
    _check_settings(max_new_tokens, temperature, top_k, top_p, gamma, draft_threshold)
    _check_vocab(target, draft)
    # tokens (1, prompt + max_new_tokens): the run's tokens on the device, the prompt first
    tokens, t0, prefill_seconds = _start([target, draft], prompt_ids, max_new_tokens)
    generator, dtype = make_generator(tokens.device, seed), dtype or sampling_dtype(tokens.device)
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    stop_ids, new_ids, rounds = set(stop_ids or ()), [], []
    n = len(prompt_ids)  # tokens so far; the target's cache holds the first n - 1
    read = n - 1  # how many the draft's cache holds
    while len(new_ids) < max_new_tokens:
        # 1. the draft reads what it has not seen (1 token, or 2 after a round that accepted every
        # draft), then proposes x_1..x_k, x_i ~ q_i; a round emits at most k + 1 tokens: never draft
        # past max_new_tokens
        k = min(gamma, max_new_tokens - len(new_ids) - 1)
        x, q, read, draft_forwards = _draft(draft, tokens[:, read:n], read, k, filters, draft_threshold,
                                            generator, dtype)

        # 2. the target scores [last token, x_1..x_k] in ONE forward: p_1..p_{k+1}
        inp = torch.cat([tokens[0, n - 1:n], x]).view(1, -1)  # (1, k+1)
        logits = target(inp, input_pos=n - 1, last_n=len(x) + 1)
        p = sample_probs(logits[0], **filters)  # (k+1, V)

        # 3. verify: accept a prefix of the drafts, and add one token sampled by the target
        n_accepted, token = verify(x, q, p, generator, dtype, on_device=True)
        n_accepted, *proposed = torch.cat([n_accepted.view(1), x, token.view(1)]).tolist()  # one sync
        new = proposed[:n_accepted] + proposed[-1:]

        # 4. advance both caches to the accepted tokens; "rolling back" is only that: slots past
        # them hold rejected tokens, are never attended to, and are overwritten by the next round
        tokens[0, n:n + len(new)] = torch.cat([x[:n_accepted], token.view(1)])
        read = min(read, n + n_accepted)
        new, n_accepted, n_drafted = _cut_at_stop(new, n_accepted, len(x), stop_ids)
        rounds.append((n_drafted, n_accepted, draft_forwards))
        new_ids += new
        n += len(new)
        if on_tokens is not None:
            on_tokens(new, n_accepted)
        if new[-1] in stop_ids:
            break

    stats = _stats(rounds, gamma, len(new_ids), t0, prefill_seconds, tokens.device)
    stats.update(cost_ratio(draft, target))
    stats["mbsu"] = mbsu(stats["block_efficiency"], stats["effective_gamma"], stats["c"])
    return new_ids, stats


def _draft(draft, fresh, pos, k, filters, threshold, generator, dtype):
    """Step 1 of a round: the draft reads `fresh` (1, 1 or 2) at cache slot pos, then drafts up to k tokens
    x_i ~ q_i -> (x (n,), q (n, V), slots its cache now holds, forwards it ran); n < k where the draft-length rule
    stopped it. Everything stays on the device: no host sync unless the rule is on."""
    x = torch.empty(k, dtype=torch.long, device=fresh.device)
    q = torch.empty(k, draft.config.vocab_size, device=fresh.device)
    n = forwards = 0
    while n < k:
        logits = draft.to_vocab(draft(fresh, input_pos=pos, last_n=1))[0, -1]  # (V,), -inf off a trimmed head
        pos, forwards = pos + fresh.size(1), forwards + 1
        q[n] = sample_probs(logits, **filters)
        if threshold:  # a host sync per draft step; greedy's q is one-hot, so there judge the softmax
            confidence = q[n] if filters["temperature"] else torch.softmax(logits, -1)
            if confidence.max().item() < threshold:
                break  # the draft has read x_n already: next round it needs only what the target adds
        x[n] = sample(q[n], generator, dtype)
        fresh, n = x[n:n + 1].view(1, 1), n + 1
        common.mark_step(x.device)  # Gaudi's lazy mode: one graph per draft step, not one per round
    return x[:n], q[:n], pos, forwards


def _cut_at_stop(new, n_accepted, n_drafted, stop_ids):
    """A round's tokens up to the first stop token (included) -> (new, n_accepted, n_drafted). A stop token among
    the accepted drafts ends the round there: the drafts after it count as neither drafted nor accepted."""
    for i, token in enumerate(new[:n_accepted]):
        if token in stop_ids:
            return new[:i + 1], i + 1, i + 1
    return new, n_accepted, n_drafted


def _stats(rounds, gamma, new_tokens, t0, prefill_seconds, device):
    """Stop the clock; the counts and rates of a run from its rounds, each (drafted, accepted, draft forwards) of
    one target forward. alpha = accepted / drafted (it falls with gamma); the per-token acceptance beta = accepted
    / (accepted + rejections) (it does not; a round rejects once at most); tau = new tokens / target forwards; the
    effective gamma = draft forwards / target forwards (what a round paid in draft steps)."""
    common.sync(device)  # the device may still be working: wait before reading the clock
    seconds = time.perf_counter() - t0
    drafted, accepted, draft_forwards = (sum(r[i] for r in rounds) for i in range(3))
    rejections, n_rounds = sum(a < d for d, a, _ in rounds), len(rounds)
    return dict(
        drafted=drafted, accepted=accepted, rejections=rejections, target_forwards=n_rounds,
        draft_forwards=draft_forwards, new_tokens=new_tokens, gamma=gamma, seconds=seconds,
        prefill_seconds=prefill_seconds, tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
        # how far drafts go: [i] counts the rounds that drafted (accepted) a token i+1
        drafted_per_position=[sum(d > i for d, _, _ in rounds) for i in range(gamma)],
        accepted_per_position=[sum(a > i for _, a, _ in rounds) for i in range(gamma)],
        acceptance_rate=accepted / drafted if drafted else 0.0,
        beta=accepted / (accepted + rejections) if accepted + rejections else 0.0,
        block_efficiency=new_tokens / n_rounds if n_rounds else 0.0,
        effective_gamma=draft_forwards / n_rounds if n_rounds else 0.0)


STATIC_BUCKET = 64  # cache slots read at a time where shapes must repeat (accelerators, --compile)


def _start(models, prompt_ids, max_new_tokens):
    """Check the run fits, make room in the caches and write prompt[:-1] into them -> (tokens (1, prompt +
    max_new_tokens) on the device, the prompt first; the clock's start; the prefill's seconds). The first step
    feeds the last prompt token, so every counted forward produces tokens and the prefill none."""
    _check_run(prompt_ids, models, max_new_tokens)
    device = next(models[0].parameters()).device
    tokens = torch.tensor([list(prompt_ids) + [0] * max_new_tokens], device=device)  # the run's one upload
    models = list({id(m): m for m in models}.values())  # the target as its own draft: one cache, filled once
    for m in models:
        if device.type != "cpu":  # accelerators compile a graph per shape: read the cache in buckets (static)
            m.cache_bucket = max(m.cache_bucket, STATIC_BUCKET)
        m.setup_cache(1, len(prompt_ids) + max_new_tokens - 1)
    common.sync(device)
    t0 = time.perf_counter()
    for m in models:
        if len(prompt_ids) > 1:
            m.prefill(tokens[:, :len(prompt_ids) - 1])
    common.sync(device)
    return tokens, t0, time.perf_counter() - t0


def _check_settings(max_new_tokens, temperature, top_k, top_p, gamma=None, draft_threshold=0.0):
    if max_new_tokens < 1:
        raise common.UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if gamma is not None and gamma < 1:
        raise common.UserError(f"gamma (draft tokens per round) must be >= 1, got {gamma}")
    if not 0.0 <= draft_threshold <= 1.0:
        raise common.UserError(f"draft_threshold must be in [0, 1] (0 = off), got {draft_threshold}")
    if temperature < 0:
        raise common.UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise common.UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise common.UserError(f"top_p must be in (0, 1], got {top_p}")


def _check_run(prompt_ids, models, max_new_tokens):
    """A prompt, and room in every model's context for what a run writes to its cache: the prompt and the new
    tokens but the last, which is sampled and never fed (the drafts never reach past max_new_tokens either)."""
    if len(prompt_ids) == 0:
        raise common.UserError("the prompt is empty: give at least one token of prompt")
    needed = len(prompt_ids) + max_new_tokens - 1
    for m in models:
        if needed > m.config.max_seq_len:
            raise common.UserError(f"the prompt ({len(prompt_ids)} tokens) and max_new_tokens ({max_new_tokens}) "
                                   f"need {needed} positions, more than a model's context of "
                                   f"{m.config.max_seq_len}; shorten the prompt or max_new_tokens")


def _check_vocab(target, draft):
    """verify() compares the two models' probabilities token id by token id: one vocabulary (the CLI compares
    the tokenizers too), and the target's whole head (a trimmed draft head maps into the vocabulary itself)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise common.UserError(f"vocabulary mismatch: the target has {target.config.vocab_size} tokens, the draft "
                               f"has {draft.config.vocab_size}; train the draft with the target's tokenizer")
    if target.is_trimmed:
        raise common.UserError("the target's head is trimmed: speculative decoding needs its whole distribution")


# -----------------------------------------------------------------------------
# 4. metrics

def cost_ratio(draft, target):
    """c = draft parameters / target parameters, in total and without the embedding table: a proxy for the
    per-token cost when decoding is memory-bound (bench.py measures c_time, what the wall clock pays)."""
    return {"c": draft.num_params() / target.num_params(),
            "c_non_embedding": draft.num_params(non_embedding=True) / target.num_params(non_embedding=True)}


def mbsu(block_efficiency, gamma, c):
    """Memory-bound speedup tau / (gamma * c + 1): tau tokens per round for the price of one target forward and
    gamma draft steps that each cost c target forwards (Leviathan et al. 2023, the walltime improvement). Runs
    pass their effective gamma (draft forwards per round): what they paid, also when drafting stops early."""
    return block_efficiency / (gamma * c + 1)


def speedup(base_seconds, base_tokens, spec_seconds, spec_tokens):
    """Wall-clock speedup = autoregressive seconds per token / speculative seconds per token (per token: sampled
    runs may stop at different lengths). None where a side made none."""
    if not (base_tokens and spec_tokens and spec_seconds):
        return None
    return (base_seconds / base_tokens) / (spec_seconds / spec_tokens)


# -----------------------------------------------------------------------------
# 5. which dtype each job runs fastest in, on this machine

@torch.no_grad()
def step_costs(target, draft, prompt_ids, gamma, repeats=7):
    """Median seconds of the forwards a round is made of: one draft step, one target forward over gamma+1
    tokens, and one target forward over 1 token (what plain decoding pays per token)."""
    device = next(target.parameters()).device
    n = len(prompt_ids)
    for m in (target, draft):
        m.setup_cache(1, max_seq_len=n + gamma + 1)
        if n > 1:  # the prompt but its last token, as generate() leaves the caches before a round
            m(torch.tensor([prompt_ids[:-1]], device=device), input_pos=0, last_n=1)

    def median_seconds(m, n_tokens):
        x = torch.tensor([prompt_ids[-1:] * n_tokens], device=device)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            common.sync(device)
            t0 = time.perf_counter()
            m(x, input_pos=n - 1, last_n=n_tokens)[0, -1, 0].item()  # .item(): it really ran (lazy devices)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    return {"t_draft": median_seconds(draft, 1), "t_target_1": median_seconds(target, 1),
            "t_target_gamma1": median_seconds(target, gamma + 1)}


def in_dtype(model, dtype):
    """The model itself if it is in dtype already, else a copy in dtype (the original is kept)."""
    return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)


def fastest_dtypes(target, draft, gamma, prepack=False, say=print):
    """--dtype auto on a CPU with bf16 units: time both jobs in float32 and bfloat16 and give each the faster
    -> {"autoregressive": dtype, "speculative": dtype}. Plain decoding pays a 1-token target forward a token; a
    round pays gamma draft steps and a (gamma+1)-token target forward. Which wins depends on the CPU (Intel's AMX
    makes a 1-row bf16 matmul slower than fp32's, 4 rows as cheap as 1), so it is measured once per machine and
    cached ($FASTDRAFT_CACHE, default ~/.cache/fastdraft/decode_dtypes.json; delete the file to measure again)."""
    key = (f"{common.cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | target "
           f"{target.num_params()} | draft {draft.num_params()} | gamma {gamma}" + " | prepacked bf16" * prepack)
    path = common.cache_file("decode_dtypes.json")
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    costs, how = cache.get(key), f"cached in {path}"
    if costs is None:
        prompt = list(range(1, 65))  # a 64-token context: what a chat prompt gives the caches to read
        runs = {name: [] for name in ("float32", "bfloat16")}
        for _ in range(2):  # interleaved, so a change in the machine's load hits both dtypes alike
            for name in runs:
                dt = common.parse_dtype(name)
                t, d = in_dtype(target, dt), in_dtype(draft, dt)
                if prepack and dt == torch.bfloat16:  # what --prepack will run: packed bf16 weights
                    t, d = model.prepack_for_cpu(t), model.prepack_for_cpu(d)
                runs[name].append(step_costs(t, d, prompt, gamma, repeats=5))
        # the smaller of two medians: a busy machine only ever adds time
        costs = {name: {k: min(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        cache[key] = costs
        common.write_json(path, cache)
        how = f"measured now, cached in {path}"
    per_token = {name: c["t_target_1"] for name, c in costs.items()}
    per_round = {name: gamma * c["t_draft"] + c["t_target_gamma1"] for name, c in costs.items()}
    picks = {"autoregressive": min(per_token, key=per_token.get), "speculative": min(per_round, key=per_round.get)}
    say(f"dtype auto ({how}): plain decoding {picks['autoregressive']} (a token: "
        + ", ".join(f"{n} {1000 * t:.1f} ms" for n, t in per_token.items()) + f"); speculative "
        f"{picks['speculative']} (a round of gamma {gamma}: "
        + ", ".join(f"{n} {1000 * t:.1f} ms" for n, t in per_round.items()) + ")")
    return {job: common.parse_dtype(name) for job, name in picks.items()}


# -----------------------------------------------------------------------------
# 6. the command line

def compile_models(device, *models):
    """--compile: torch.compile every model's decoder layers once, with static shapes (compile_blocks): CUDA graphs
    on cuda (the KV caches are buffers, allocated once), Gaudi's backend on hpu, inductor's C++ on the CPU. Inductor
    keeps what it compiled on disk (~/.cache/fastdraft/inductor): the long warm-up is paid once per machine."""
    if device.type == "hpu" and common.hpu_lazy():
        raise common.UserError("--compile needs Gaudi's eager mode (PT_HPU_LAZY_MODE=0): lazy mode has no "
                               "torch.compile backend")
    kwargs = {"hpu": {"backend": "hpu_backend"}, "cuda": {"mode": "reduce-overhead"}}.get(device.type, {})
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/fastdraft/inductor"))
    for m in {id(m): m for m in models}.values():  # the target as its own draft is compiled once
        m.compile_blocks(**kwargs)


# The draft-length rule's default, chosen on bench.py's tuning prompts (--prompt-set tune: 5 a task, disjoint from
# the reported ones), shipped SmolLM2 draft, gamma 3, T 0 and 0.6, 96 tokens: the speedup the measured step costs
# predict (2-core Intel Xeon, bf16 rounds, fp32 plain decoding), geometric mean over the 4 tasks x 2 temperatures,
# was 1.19 / 1.16 / 1.08x at P 0 / 0.3 / 0.5 (prepacked bf16: 1.28 / 1.26 / 1.18x). So the rule is off by
# default, which also keeps a round to one host sync on accelerators; it helps where drafts are often wrong.
DEFAULT_THRESHOLD = 0.0
# The draft length's default, chosen the same way (5 Dec 2026, the 5 Dec draft (5M PT tokens + KD), P 0, bench.py --prompt-set
# tune --limit 10 --gamma 1,2,3, 96 tokens, prepacked bf16, quiet 2-core Intel Xeon, measured speedups over the
# fastest plain decoding): geometric mean over the 4 tasks x 2 temperatures 1.17 / 1.24 / 1.18x at gamma 1 / 2 / 3
# (results/ablation_23/gamma_tune.md). A round's verify costs a little more per extra token on a CPU, and this
# draft's third token is accepted only 3-18% of the time. On the reported prompts, one run (6 Dec): 1.15 vs 1.11x.
DEFAULT_GAMMA = 2


def main():
    ap = argparse.ArgumentParser(description="Speculative decoding with a draft model (exact: the output is "
                                             "distributed as the target's own samples).")
    ap.add_argument("--target", default="smollm2", help="target model: our folder, HF folder, .gguf or 'smollm2'")
    ap.add_argument("--draft", default=None, help="draft model with the target's vocabulary (same spec forms; "
                    "'smollm2' uses the target as its own draft; default: the draft shipped for the target)")
    ap.add_argument("--prompt", default="The three most useful ideas in computer science are", help="prompt text")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    ap.add_argument("--gamma", type=int, default=DEFAULT_GAMMA, help="draft tokens per round (with a threshold: "
                    "the most)")
    ap.add_argument("--draft-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="P", help="stop a round's "
                    "drafting where the draft's most likely token has probability < P (0 = off: always gamma)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability mass")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="how many tokens to generate at most")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the run is reproducible)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|hpu")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, hpu and CPUs with bf16 matrix "
                                                    "units, else float32)|float32|bfloat16|float16")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models' layers (slow first steps; "
                    "CUDA graphs on cuda)")
    ap.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True, help="bf16 on a CPU: lay the "
                    "weights out once for oneDNN (faster steps where bf16 matmuls pay a per-call reorder, e.g. AMX "
                    "Xeons; the weights' memory twice); --dtype auto times it against fp32 per job")
    ap.add_argument("--visualize", action="store_true", help="colour accepted draft and target-sampled tokens apart")
    ap.add_argument("--compare", action="store_true", help="also time the autoregressive baseline: both speeds and "
                    "the wall-clock speedup (bench.py measures what each forward costs and predicts the speedup)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the final numbers as one JSON object")
    args = ap.parse_args()

    # cheap checks first, before seconds of model loading
    if not args.prompt:
        raise common.UserError("the prompt is empty: pass --prompt TEXT")
    _check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.gamma, args.draft_threshold)
    checkpoint.resolve_spec(args.target)
    args.draft = args.draft or checkpoint.default_draft(args.target)
    checkpoint.resolve_spec(args.draft)

    device = common.pick_device(args.device)
    measure = common.measure_decode_dtype(device, args.dtype)  # auto on a CPU with bf16 units: time both
    dtype = torch.float32 if measure else common.decode_dtype(device, args.dtype)
    target = checkpoint.load_model(args.target, device=device, dtype=dtype)
    # the target as its own draft: one copy in memory (generate() handles the shared cache)
    draft = target if args.draft == args.target else checkpoint.load_model(args.draft, device=device, dtype=dtype)
    _check_vocab(target, draft)  # the size first: it needs no tokenizer
    tok = tokenizer.load_tokenizer(args.target)
    if draft is not target:
        tokenizer.check_draft_vocab(tok, args.draft, draft.config.vocab_size)
    # each job in its own fastest dtype; --compare also times plain decoding in the speculative run's dtype
    dtypes = fastest_dtypes(target, draft, args.gamma, prepack=args.prepack) if measure else \
        dict(autoregressive=dtype, speculative=dtype)
    spec_dtype, base_dtype = dtypes["speculative"], dtypes["autoregressive"]
    same = draft is target
    target = in_dtype(target, spec_dtype)
    draft = target if same else in_dtype(draft, spec_dtype)
    bases = {base_dtype: in_dtype(target, base_dtype)}  # the fastest plain decoding (first), the same dtype's
    if args.compare:
        bases.setdefault(spec_dtype, target)
    if args.prepack:  # bf16 on a CPU only (model.prepack_for_cpu); each model object is packed once
        for m in {id(m): m for m in (target, draft, *bases.values())}.values():
            model.prepack_for_cpu(m)
    if args.compile:
        compile_models(device, target, draft, *bases.values())

    prompt_ids = tok.chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    stop_ids=tok.stop_ids)
    spec_settings = dict(gamma=args.gamma, draft_threshold=args.draft_threshold, **settings)

    # stream: bytes go through an incremental UTF-8 decoder, since one character may span several tokens
    colour = args.visualize and sys.stdout.isatty()
    DRAFT_COLOUR, TARGET_COLOUR, RESET = "\033[32m", "\033[33m", "\033[0m"  # green: draft was right; yellow: target
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(tokens, n_from_draft):
        for i, t in enumerate(tokens):
            text = "" if t in tok.stop_ids else decoder.decode(tok.decode_bytes([t]))
            if colour and text:
                text = (DRAFT_COLOUR if i < n_from_draft else TARGET_COLOUR) + text + RESET
            sys.stdout.write(text)
        sys.stdout.flush()

    if args.compare:  # warm-up: first calls pay for allocation and lazy initialisation
        generate(target, draft, prompt_ids, min(8, args.max_new_tokens), **spec_settings)
        for base_target in bases.values():
            autoregressive(base_target, prompt_ids, min(8, args.max_new_tokens), **settings)
    if colour:
        print(f"{DRAFT_COLOUR}accepted draft tokens{RESET}  {TARGET_COLOUR}tokens sampled by the target{RESET}")
    if not args.chat:
        sys.stdout.write(args.prompt)
    rounds = []  # --compare times a silent run and shows its tokens afterwards, outside the timed window
    _, spec = generate(target, draft, prompt_ids, args.max_new_tokens,
                       on_tokens=(lambda *r: rounds.append(r)) if args.compare else show, **spec_settings)
    for tokens, n_from_draft in rounds:
        show(tokens, n_from_draft)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n\n")

    report = {"target": args.target, "draft": args.draft, "prompt_tokens": len(prompt_ids), "gamma": args.gamma,
              "draft_threshold": args.draft_threshold, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "dtype": _name(spec_dtype),
              "dtypes": {job: _name(d) for job, d in dtypes.items()}, "speculative": spec}
    print(f"speculative:    {spec['new_tokens']} tokens in {spec['seconds']:.2f} s = "
          f"{spec['tokens_per_second']:.1f} tokens/s | acceptance rate {spec['acceptance_rate']:.3f} "
          f"(per token {spec['beta']:.3f}) | block efficiency {spec['block_efficiency']:.2f} | "
          f"effective gamma {spec['effective_gamma']:.2f} | per position {spec['accepted_per_position']} "
          f"of {spec['target_forwards']} rounds")
    print(f"cost ratio c = {spec['c']:.4f} (non-embedding {spec['c_non_embedding']:.4f}) | MBSU {spec['mbsu']:.2f}")

    if args.compare:  # plain decoding, timed silently too; its text is shown after the numbers
        runs = {d: autoregressive(m, prompt_ids, args.max_new_tokens, **settings) for d, m in bases.items()}
        walls = {d: speedup(b["seconds"], b["new_tokens"], spec["seconds"], spec["new_tokens"])
                 for d, (_, b) in runs.items()}
        base_dtype = min(walls, key=walls.get)  # the plain run that was faster here (a cached pick may be stale)
        report.update(autoregressive=runs[base_dtype][1], speedup=walls[base_dtype],
                      autoregressive_same_dtype=runs[spec_dtype][1], speedup_same_dtype=walls[spec_dtype])
        for d, (_, b) in runs.items():
            why = ["the fastest plain decoding here"] * (d == base_dtype) + ["the speculative run's dtype"] * (
                d == spec_dtype)
            print(f"autoregressive: {b['new_tokens']} tokens in {b['seconds']:.2f} s = "
                  f"{b['tokens_per_second']:.1f} tokens/s in {_name(d)}" + (f" ({', '.join(why)})" * bool(why)))
        line = f"wall-clock speedup {walls[base_dtype]:.2f}x over the fastest plain decoding ({_name(base_dtype)})"
        if base_dtype != spec_dtype:
            line += f" | {walls[spec_dtype]:.2f}x over plain decoding in {_name(spec_dtype)}, the same dtype"
        print(f"{line} | MBSU {spec['mbsu']:.2f}")
        ar_ids = [t for t in runs[base_dtype][0] if t not in tok.stop_ids]
        print(f"\nautoregressive text:\n{'' if args.chat else args.prompt}{tok.decode(ar_ids)}")
    if args.json:
        common.write_json(args.json, report)


def _name(dtype):
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    common.run_cli(main)
