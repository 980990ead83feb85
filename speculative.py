"""
Speculative decoding, by hand: a small draft model proposes gamma tokens, the target scores them all in one
forward pass, and exact rejection sampling keeps or replaces them so that the output is distributed exactly as
if the target had sampled alone (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling", Algorithm 2).

Read top to bottom:
  1. sample_probs / sample   - the one sampling filter (temperature, top-k, top-p) both models go through
  2. verify                  - the accept / reject step, the heart of the method
  3. autoregressive          - the plain baseline: one target forward per token
  4. generate                - the speculative loop with static KV caches
  5. metrics                 - acceptance rate, block efficiency, cost ratio, MBSU
  6. the command line        - stream, visualise, compare against the baseline

Run: python speculative.py --draft smollm2 --compare     (the target as its own draft: acceptance 1.0)
"""

import argparse
import codecs
import json
import os
import statistics
import sys
import time

import torch

import checkpoint
import common

# -----------------------------------------------------------------------------
# 1. sampling: the ONE filter both models go through


def sample_probs(logits, temperature, top_k=None, top_p=None):
    """Logits (..., V) -> the probabilities a token is actually sampled from, float32 (..., V).

    Temperature 0 means greedy: a one-hot vector on the argmax. Speculative sampling is only exact if q is
    *exactly* the distribution the draft sampled from and p is the target's under the same filters, so both
    models go through this one function (raw softmax instead would inflate acceptance by 1/Z).
    """
    logits = logits.float()
    if temperature == 0:
        # one-hot: greedy is the special case of sampling where all mass sits on the argmax
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


def sample(probs, generator=None):
    """Draw one token id per row of (..., V) non-negative weights (need not sum to 1), without a host sync.

    Inverse transform sampling: with v uniform in (0, total], token i is the first whose cumulative weight
    reaches v, i.e. v fell in its interval (cdf_{i-1}, cdf_i] of width w_i. A zero-weight token has an empty
    interval and is never drawn; a one-hot row always gives its hot token. The cumulative sum is in float64:
    over a 100k-token vocabulary, float32 rounding errors would be as large as small tokens' probabilities.
    (One uniform per row; torch.multinomial or an exponential race over V random numbers cost ~10x more on CPU.)
    """
    cdf = probs.double().cumsum(-1)  # (..., V)
    u = 1.0 - torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, generator=generator, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)  # u * total <= total: never past the end


# -----------------------------------------------------------------------------
# 2. verify: exact rejection sampling


def verify(draft_tokens, q, p, generator=None):
    """Accept or reject the draft's gamma tokens; returns (n_accepted, next_token) as Python ints.

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
    r = 1.0 - torch.rand(gamma, dtype=torch.float64, generator=generator, device=q.device)  # (gamma,)
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
    next_token = sample(residual, generator)
    n_accepted, next_token = torch.stack([n, next_token]).tolist()  # the one host sync of a round
    return n_accepted, next_token


# -----------------------------------------------------------------------------
# 3. and 4. the decoding loops


def _device(m):
    return next(m.parameters()).device


def _make_generator(device, seed):
    """A torch.Generator on the model's device: a seed makes the whole run reproducible."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _check_settings(max_new_tokens, temperature, top_k, top_p, gamma=None):
    if max_new_tokens < 1:
        raise common.UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if gamma is not None and gamma < 1:
        raise common.UserError(f"gamma (draft tokens per round) must be >= 1, got {gamma}")
    if temperature < 0:
        raise common.UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise common.UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise common.UserError(f"top_p must be in (0, 1], got {top_p}")


def _check_prompt(prompt_ids):
    if len(prompt_ids) == 0:
        raise common.UserError("the prompt is empty: give at least one token of prompt")


def _check_context(m, name, needed, what):
    if needed > m.config.max_seq_len:
        raise common.UserError(f"{what} = {needed} tokens is longer than the {name} model's context of "
                          f"{m.config.max_seq_len} tokens; shorten the prompt or max_new_tokens")


def _prefill(m, prompt_ids, device):
    """Write prompt[:-1] into the model's KV cache. The last prompt token is fed by the first decoding step, so
    every counted forward produces tokens and the prefill produces none."""
    if len(prompt_ids) > 1:
        m(torch.tensor([prompt_ids[:-1]], device=device), input_pos=0, last_n=1)


def _finish_stats(stats, t0, device):
    common.sync(device)  # the device may still be working: wait before reading the clock
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_second"] = stats["new_tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    stats["block_efficiency"] = stats["new_tokens"] / stats["target_forwards"] if stats["target_forwards"] else 0.0
    return stats


@torch.no_grad()
def autoregressive(target, prompt_ids, max_new_tokens, temperature=0.6, top_k=None, top_p=None, seed=None,
                   stop_ids=None, on_token=None):
    """The baseline: one target forward per new token, same sampling filter. Returns (new_ids, stats).

    Stops after max_new_tokens, or right after emitting a token in stop_ids (the stop token is included in
    new_ids). on_token(token_id) is called for each new token as it is produced.
    """
    _check_prompt(prompt_ids)
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    _check_context(target, "target", len(prompt_ids) + max_new_tokens, "prompt + max_new_tokens")
    device = _device(target)
    generator = _make_generator(device, seed)
    stop_ids = set(stop_ids or ())
    stats = dict(drafted=0, accepted=0, accepted_per_position=[], target_forwards=0, draft_forwards=0,
                 new_tokens=0, gamma=0)
    target.setup_cache(1, max_seq_len=len(prompt_ids) + max_new_tokens)
    common.sync(device)
    t0 = time.perf_counter()
    _prefill(target, prompt_ids, device)
    common.sync(device)
    stats["prefill_seconds"] = time.perf_counter() - t0

    new_ids = []
    token = prompt_ids[-1]
    pos = len(prompt_ids) - 1  # cache position of `token`
    while len(new_ids) < max_new_tokens:
        logits = target(torch.tensor([[token]], device=device), input_pos=pos, last_n=1)  # (1, 1, V)
        probs = sample_probs(logits[0, -1], temperature, top_k, top_p)  # (V,)
        token = sample(probs, generator).item()
        pos += 1
        stats["target_forwards"] += 1
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            break
    stats["new_tokens"] = len(new_ids)
    return new_ids, _finish_stats(stats, t0, device)


@torch.no_grad()
def generate(target, draft, prompt_ids, max_new_tokens, gamma=3, temperature=0.6, top_k=None, top_p=None,
             seed=None, stop_ids=None, on_tokens=None):
    """Speculative sampling with static KV caches (Leviathan et al. 2023, Algorithm 1, looped). Returns
    (new_ids, stats); the output is distributed exactly as autoregressive(target, ...) would sample it.

    Per round: the draft proposes gamma tokens one by one; the target scores the last accepted token plus the
    gamma drafts in ONE forward (gamma+1 distributions); verify() keeps a prefix and adds one token; both caches
    "roll back" simply by starting the next round at the accepted length (stale slots are never attended and get
    overwritten). on_tokens(tokens, n_from_draft) is called once per round with the new tokens, the first
    n_from_draft of which are accepted draft tokens and the last one sampled by the target. Stops exactly at
    max_new_tokens or right after a token in stop_ids (included in new_ids), even when it is an accepted draft.

    draft may be the very same object as target: both then share one KV cache, which stays correct because the
    two write the same tokens' keys and values at the same positions.
    """
    _check_prompt(prompt_ids)
    _check_settings(max_new_tokens, temperature, top_k, top_p, gamma)
    check_same_vocab(target, draft)
    # the target's last forward may reach gamma slots past the end; keep the bound simple and safe
    needed = len(prompt_ids) + max_new_tokens + gamma + 1
    _check_context(target, "target", needed, "prompt + max_new_tokens + gamma + 1")
    _check_context(draft, "draft", needed, "prompt + max_new_tokens + gamma + 1")
    device = _device(target)
    generator = _make_generator(device, seed)
    stop_ids = set(stop_ids or ())
    # accepted_per_position[i]: rounds whose draft token i+1 was accepted (a histogram of how far drafts go);
    # drafted_per_position[i]: rounds that drafted a token i+1 (the last rounds may draft fewer than gamma);
    # forward counts leave out the prefill, which produces no token; seconds includes it (prefill_seconds too)
    stats = dict(drafted=0, accepted=0, accepted_per_position=[0] * gamma, drafted_per_position=[0] * gamma,
                 target_forwards=0, draft_forwards=0, new_tokens=0, gamma=gamma)
    target.setup_cache(1, max_seq_len=needed)
    draft.setup_cache(1, max_seq_len=needed)
    common.sync(device)
    t0 = time.perf_counter()
    _prefill(target, prompt_ids, device)
    _prefill(draft, prompt_ids, device)
    common.sync(device)
    stats["prefill_seconds"] = time.perf_counter() - t0

    ids = list(prompt_ids)  # everything so far; the target's cache always holds ids[:-1]
    draft_len = len(ids) - 1  # the draft's cache holds ids[:draft_len]
    n_prompt = len(prompt_ids)
    while len(ids) - n_prompt < max_new_tokens:
        # a round emits at most g + 1 tokens: never draft past max_new_tokens
        g = min(gamma, max_new_tokens - (len(ids) - n_prompt) - 1)

        # 1. draft g tokens one by one, feeding first the tokens it has not seen yet (1, or 2 after a round where
        # every draft was accepted: the last draft token and the bonus token)
        inp = torch.tensor([ids[draft_len:]], device=device)  # (1, 1 or 2)
        qs, xs = [], []
        for _ in range(g):
            logits = draft(inp, input_pos=draft_len, last_n=1)  # (1, 1, V)
            q_i = sample_probs(logits[0, -1], temperature, top_k, top_p)  # (V,)
            x_i = sample(q_i, generator)  # () stays on the device: no sync while drafting
            draft_len += inp.size(1)
            inp = x_i.view(1, 1)
            qs.append(q_i)
            xs.append(x_i)
        # x_g itself was never fed to the draft; it is fed next round if accepted

        # 2. the target scores [last token, x_1..x_g] in one forward: p_1..p_{g+1}
        drafts = torch.stack(xs) if g else torch.zeros(0, dtype=torch.long, device=device)  # (g,)
        inp = torch.cat([torch.tensor(ids[-1:], device=device), drafts]).view(1, g + 1)
        logits = target(inp, input_pos=len(ids) - 1, last_n=g + 1)  # (1, g+1, V)
        p = sample_probs(logits[0], temperature, top_k, top_p)  # (g+1, V)
        q = torch.stack(qs) if g else p.new_zeros(0, p.size(-1))  # (g, V)

        # 3. accept a prefix of the drafts, add one token from the target
        n, next_token = verify(drafts, q, p, generator)
        new = drafts[:n].tolist() + [next_token]  # verify already synced: this copy does not stall
        stats["drafted"] += g
        stats["accepted"] += n
        for i in range(g):
            stats["drafted_per_position"][i] += 1
        for i in range(n):
            stats["accepted_per_position"][i] += 1
        stats["target_forwards"] += 1
        stats["draft_forwards"] += g

        # 4. roll back by position: caches past the accepted length hold rejected tokens and are simply ignored
        draft_len = min(draft_len, len(ids) + n)
        n_from_draft = n
        for i, t in enumerate(new):
            if t in stop_ids:
                new = new[: i + 1]
                n_from_draft = min(n, i + 1)
                break
        ids.extend(new)
        if on_tokens is not None:
            on_tokens(new, n_from_draft)
        if new[-1] in stop_ids:
            break

    stats["new_tokens"] = len(ids) - n_prompt
    stats.update(cost_ratio(draft, target))
    stats = _finish_stats(stats, t0, device)
    stats["mbsu"] = mbsu(stats["block_efficiency"], gamma, stats["c"])
    return ids[n_prompt:], stats


# -----------------------------------------------------------------------------
# 5. vocabulary check and metrics


def check_same_vocab(target, draft, target_tok=None, draft_tok=None):
    """Raise UserError unless draft and target share the exact vocabulary (same size; same token byte strings
    in the same order when both tokenizers are given)."""
    why = ("speculative decoding compares the two models' probabilities token id by token id, so the draft must "
           "use the target's exact vocabulary (train it with the target's tokenizer)")
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise common.UserError(f"vocabulary mismatch: target has {vt} tokens, draft has {vd}; {why}")
    if target_tok is not None and draft_tok is not None and target_tok.fingerprint() != draft_tok.fingerprint():
        raise common.UserError(f"vocabulary mismatch: both have {vt} tokens but different token strings; {why}")


def cost_ratio(draft, target):
    """c = draft parameters / target parameters, in total and without the embedding table (DESIGN.md, Metrics).
    A parameter count is a proxy for the per-token cost when decoding is memory-bound."""
    return {"c": draft.num_params() / target.num_params(),
            "c_non_embedding": draft.num_params(non_embedding=True) / target.num_params(non_embedding=True)}


def mbsu(block_efficiency, gamma, c):
    """Memory-bound speedup tau / (gamma * c + 1): tau tokens per round for the price of one target forward and
    gamma draft steps that each cost c target forwards (Leviathan et al. 2023, the walltime improvement)."""
    return block_efficiency / (gamma * c + 1)


# -----------------------------------------------------------------------------
# 6. the command line


@torch.no_grad()
def measure_costs(target, draft, prompt_ids, gamma, repeats=7):
    """Median seconds of the forwards a round is made of: one draft step, one target forward over gamma+1
    tokens, and one target forward over 1 token (what the baseline pays per token)."""
    device = _device(target)
    n = len(prompt_ids)

    def timed(m, n_tokens):
        x = torch.tensor([prompt_ids[-1:] * n_tokens], device=device)
        times = []
        for _ in range(repeats + 1):  # the first call is a warm-up
            common.sync(device)
            t0 = time.perf_counter()
            logits = m(x, input_pos=n - 1, last_n=n_tokens)
            logits[0, -1, 0].item()  # make sure the forward really ran (lazy devices)
            common.sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    for m in (target, draft):
        m.setup_cache(1, max_seq_len=n + gamma + 1)
        _prefill(m, prompt_ids, device)
    return {"t_draft": timed(draft, 1), "t_target_1": timed(target, 1), "t_target_gamma1": timed(target, gamma + 1)}


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description="Speculative decoding with a draft model (exact: the output is "
                                             "distributed as the target's own samples).")
    ap.add_argument("--target", default="smollm2", help="target model: our folder, HF folder, .gguf or 'smollm2'")
    ap.add_argument("--draft", required=True, help="draft model with the target's vocabulary (same spec forms; "
                                                   "'smollm2' uses the target as its own draft)")
    ap.add_argument("--prompt", default="The three most useful ideas in computer science are",
                    help="prompt text")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    ap.add_argument("--gamma", type=int, default=3, help="draft tokens per round (lookahead)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability mass")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="how many tokens to generate at most")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the run is reproducible)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|hpu")
    ap.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    ap.add_argument("--visualize", action="store_true",
                    help="colour accepted draft tokens and target-sampled tokens differently (on a terminal)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the plain autoregressive baseline and report speeds, speedup and MBSU")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the final numbers as one JSON object")
    args = ap.parse_args()

    # cheap checks first, before seconds of model loading
    if not args.prompt:
        raise common.UserError("the prompt is empty: pass --prompt TEXT")
    _check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.gamma)
    checkpoint.resolve_spec(args.target)
    checkpoint.resolve_spec(args.draft)

    device = common.pick_device(args.device)
    dtype = common.parse_dtype(args.dtype)
    target = checkpoint.load_model(args.target, device=device, dtype=dtype)
    # the target as its own draft: one copy in memory (generate() handles the shared cache)
    draft = target if args.draft == args.target else checkpoint.load_model(args.draft, device=device, dtype=dtype)
    check_same_vocab(target, draft)  # the size first: it needs no tokenizer
    import data  # only here: the library part of this file needs only model.py
    tok = data.load_tokenizer(args.target)
    try:
        draft_tok = tok if draft is target else data.load_tokenizer(args.draft)
    except common.UserError:
        draft_tok = None  # no tokenizer found for the draft: the vocabulary size check above still holds
    check_same_vocab(target, draft, tok, draft_tok)

    prompt_ids = tok.chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    _check_prompt(prompt_ids)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    stop_ids=tok.stop_ids)
    run_args = (prompt_ids, args.max_new_tokens)

    # stream: bytes go through an incremental UTF-8 decoder, since one character may span several tokens
    colour = args.visualize and sys.stdout.isatty()
    DRAFT_COLOUR, TARGET_COLOUR, RESET = "\033[32m", "\033[33m", "\033[0m"  # green: draft was right; yellow: target
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(tokens, n_from_draft):
        for i, t in enumerate(tokens):
            if t in tok.stop_ids:
                continue
            text = decoder.decode(tok.decode_bytes([t]))
            if colour and text:
                text = (DRAFT_COLOUR if i < n_from_draft else TARGET_COLOUR) + text + RESET
            sys.stdout.write(text)
        sys.stdout.flush()

    if args.compare:  # warm-up: first calls pay for allocation and lazy initialisation
        warm = min(8, args.max_new_tokens)
        generate(target, draft, prompt_ids, warm, gamma=args.gamma, **settings)
        autoregressive(target, prompt_ids, warm, **settings)

    if colour:
        print(f"{DRAFT_COLOUR}accepted draft tokens{RESET}  {TARGET_COLOUR}tokens sampled by the target{RESET}")
    if not args.chat:
        sys.stdout.write(args.prompt)
    _, spec = generate(target, draft, *run_args, gamma=args.gamma, on_tokens=show, **settings)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n\n")

    report = {"target": args.target, "draft": args.draft, "prompt_tokens": len(prompt_ids), "gamma": args.gamma,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "speculative": spec}
    print(f"speculative:    {spec['new_tokens']} tokens in {spec['seconds']:.2f} s = "
          f"{spec['tokens_per_second']:.1f} tokens/s | acceptance rate {spec['acceptance_rate']:.3f} | "
          f"block efficiency {spec['block_efficiency']:.2f} | per position {spec['accepted_per_position']} "
          f"of {spec['target_forwards']} rounds")
    print(f"cost ratio c = {spec['c']:.4f} (non-embedding {spec['c_non_embedding']:.4f}) | MBSU {spec['mbsu']:.2f}")

    if args.compare:
        _, base = autoregressive(target, *run_args, **settings)
        costs = measure_costs(target, draft, prompt_ids, args.gamma)
        speedup = (base["seconds"] / base["new_tokens"]) / (spec["seconds"] / spec["new_tokens"])
        # Predicted speedup from measured costs. A round pays gamma draft steps plus one target forward over gamma+1
        # tokens and yields tau tokens; the baseline pays one 1-token target forward per token. So
        #   speedup = tau * t_target(1) / (gamma * t_draft + t_target(gamma+1))
        #           = tau / ((gamma * t_draft + t_target(gamma+1)) / t_target(1)),
        # i.e. MBSU with c and the "verifying gamma+1 tokens costs one forward" assumption replaced by timings.
        # Everything else (sampling, verify, Python) is loop overhead: realized / predicted shows how little.
        tau = spec["block_efficiency"]
        predicted = tau / ((args.gamma * costs["t_draft"] + costs["t_target_gamma1"]) / costs["t_target_1"])
        rounds = spec["target_forwards"]
        # the round time not explained by the measured forward costs: sampling, verify, Python
        forwards = spec["draft_forwards"] * costs["t_draft"] + rounds * costs["t_target_gamma1"]
        overhead_ms = 1000 * (spec["seconds"] - spec["prefill_seconds"] - forwards) / rounds
        print(f"autoregressive: {base['new_tokens']} tokens in {base['seconds']:.2f} s = "
              f"{base['tokens_per_second']:.1f} tokens/s")
        print(f"measured costs: draft step {1000 * costs['t_draft']:.2f} ms, target forward of 1 token "
              f"{1000 * costs['t_target_1']:.2f} ms, of gamma+1 = {args.gamma + 1} tokens "
              f"{1000 * costs['t_target_gamma1']:.2f} ms")
        print(f"wall-clock speedup {speedup:.2f}x | predicted from measured costs {predicted:.2f}x "
              f"(realized / predicted {speedup / predicted:.2f}) | MBSU {spec['mbsu']:.2f} | "
              f"rest {overhead_ms:.2f} ms per round (loop overhead, plus timing noise on a busy machine)")
        report.update(autoregressive=base, costs=costs, speedup=speedup, predicted_speedup=predicted,
                      overhead_ms_per_round=overhead_ms)
    if args.json:
        _write_json(args.json, report)


if __name__ == "__main__":
    common.run_cli(main)
