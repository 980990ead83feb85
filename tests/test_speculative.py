"""Speculative decoding is exact: verify() is lossless, greedy speculative output equals greedy autoregressive
output, the target as its own draft accepts everything, and bad input is a clear error."""
import copy
import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import checkpoint
import common
import tokenizer
import model as M
import speculative as S
from conftest import ROOT, tiny_model


# -----------------------------------------------------------------------------
# helpers

def chi2_pvalue(counts, probs):
    """Pearson chi-square goodness of fit of integer counts (K,) to probabilities (K,), or of each row of (R, K)
    counts to its row of probabilities: a Markov chain's transition counts (Anderson & Goodman 1957). Cells with
    probability 0 must be empty: a single token there is a hard failure, not noise."""
    counts, probs = counts.double().view(-1, counts.size(-1)), probs.double().view(-1, probs.size(-1))
    seen = counts.sum(-1) > 0  # rows never visited carry no evidence
    counts, probs = counts[seen], probs[seen] / probs[seen].sum(-1, keepdim=True)
    support = probs > 0
    assert counts[~support].sum() == 0, f"tokens emitted where p = 0: {counts}"
    expected = counts.sum(-1, keepdim=True) * probs
    stat = ((counts - expected)[support] ** 2 / expected[support]).sum()
    df = int(support.sum()) - len(counts)
    if df == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2).item()  # P(X2 >= stat)


def run_verify(q, p, trials, seed=0, dtype=torch.float64):
    """Draw x_i ~ q_i and call verify `trials` times; returns the list of emitted token lists."""
    g = torch.Generator().manual_seed(seed)
    gamma = q.size(0)
    out = []
    for _ in range(trials):
        x = torch.multinomial(q, 1, generator=g).view(gamma)
        n, t = S.verify(x, q, p, g, dtype)
        assert 0 <= n <= gamma
        out.append(x[:n].tolist() + [t])
    return out


def position_counts(emitted, k, V):
    """Histogram of the token emitted at position k, over the trials that got that far in the round."""
    return torch.bincount(torch.tensor([e[k] for e in emitted if len(e) > k], dtype=torch.long), minlength=V)


def dirichlet(rows, V):
    """Random distributions (rows, V), uniform over the simplex (the global RNG: tests seed it)."""
    x = torch.distributions.Exponential(torch.ones(rows, V)).sample()
    return x / x.sum(-1, keepdim=True)


def random_model(seed, vocab_size=64, n_layers=2, dim=64):
    """A tiny random model with untied embeddings and large weights, so its greedy outputs are varied (with a
    small tied init, every random model just repeats its input token)."""
    return tiny_model(seed, vocab_size=vocab_size, n_layers=n_layers, dim=dim, ffn_dim=128, max_seq_len=256,
                      tie_embeddings=False, weight_std=0.3)


def perturbed(m, seed, scale):
    """A draft that agrees with m part of the time: m's weights plus noise."""
    torch.manual_seed(seed)
    d = copy.deepcopy(m)
    with torch.no_grad():
        for w in d.parameters():
            if w.dim() == 2:
                w.add_(torch.randn_like(w) * scale)
    return d


@pytest.fixture(scope="module")
def tiny_pair():
    target = random_model(0)
    return target, perturbed(target, 1, 0.01)  # accepts about half of its greedy drafts


def bigram(seed, V=5):
    """A transformer whose blocks add nothing (zero weights), so its next token depends on the last token only:
    one long generation is a Markov chain whose transition counts a chi-square test checks."""
    m = tiny_model(seed, vocab_size=V, n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=2048,
                   tie_embeddings=False)
    with torch.no_grad():
        for name, w in m.named_parameters():
            if name.startswith("layers.") and w.dim() == 2:
                w.zero_()
        m.embed_tokens.weight.normal_(0.0, 1.0)
        m.lm_head.weight.normal_(0.0, 0.5)
    return m


def shallow_copy(target, n_layers):
    """A real partial-acceptance draft for SmolLM2 without training: its first n_layers blocks, its norm and its
    head, sharing the target's tensors (no copy)."""
    with torch.device("meta"):
        d = M.Transformer(dataclasses.replace(target.config, n_layers=n_layers))
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    d.load_state_dict(state, assign=True)
    d.reset_rope()
    return d.eval()


# -----------------------------------------------------------------------------
# the sampling filter

def test_sample_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    greedy = S.sample_probs(logits, 0.0)
    assert torch.equal(greedy, torch.tensor([[1.0, 0, 0, 0, 0]]))
    p = S.sample_probs(logits, 0.7)
    assert torch.allclose(p, torch.softmax(logits / 0.7, -1))
    k2 = S.sample_probs(logits, 1.0, top_k=2)
    assert (k2[0, 2:] == 0).all() and torch.allclose(k2[0, :2], torch.softmax(logits[0, :2], -1))
    full = torch.softmax(logits, -1)[0]  # [0.55, 0.20, 0.12, 0.07, 0.03]
    nucleus = S.sample_probs(logits, 1.0, top_p=0.7)  # 0.55 < 0.7 <= 0.55 + 0.20: keep two
    assert (nucleus[0, 2:] == 0).all() and torch.allclose(nucleus[0, :2], full[:2] / full[:2].sum())
    assert torch.equal(S.sample_probs(logits, 1.0, top_p=0.01)[0], torch.tensor([1.0, 0, 0, 0, 0]))
    for probs in (p, k2, nucleus):
        assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: Gaudi and MPS have no float64
def test_sample_draws_from_the_weights(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.5, 0.0, 1.5, 2.0])  # unnormalised on purpose
    draws = S.sample(w.expand(20000, 4).contiguous(), g, dtype)
    assert chi2_pvalue(torch.bincount(draws, minlength=4), w) > 1e-4
    assert S.sample(torch.tensor([0.0, 0.0, 1.0, 0.0]), g, dtype).item() == 2  # one-hot: always the hot token
    assert S.sampling_dtype("cpu") == torch.float64 and S.sampling_dtype("mps") == torch.float32


def test_gaudi_draws_its_random_numbers_on_the_cpu():
    # the Gaudi bridge has no device generators: a seeded CPU generator, its uniforms moved to the device
    g = S.make_generator(torch.device("hpu"), seed=0)
    assert g.device.type == "cpu" and S.make_generator("cpu", 0).device.type == "cpu"
    u = S.uniform(5, g, torch.device("meta"), torch.float32)  # meta stands in for a device we do not have
    assert u.device.type == "meta" and u.shape == (5,) and u.dtype == torch.float32
    r = S.uniform(10000, S.make_generator("cpu", 1), torch.device("cpu"), torch.float32)
    assert 0 < r.min() and r.max() <= 1 and abs(r.mean().item() - 0.5) < 0.02


# -----------------------------------------------------------------------------
# verify is lossless

@pytest.mark.parametrize("gamma,dtype", [(1, torch.float64), (3, torch.float64), (3, torch.float32)])
def test_verify_is_lossless_random_distributions(gamma, dtype):
    torch.manual_seed(gamma)
    V = 5
    p = dirichlet(gamma + 1, V)
    q = dirichlet(gamma, V)
    emitted = run_verify(q, p, trials=5000, seed=gamma, dtype=dtype)
    # every position of a round, among the trials that reach it, emits a token distributed as p at that position
    for k in range(gamma + 1):
        assert chi2_pvalue(position_counts(emitted, k, V), p[k]) > 1e-4, f"position {k}"
    # the first draft is accepted with probability beta = sum_x min(p(x), q(x)) (Leviathan et al. 2023):
    # not more (the inflated-acceptance bug class), not less
    beta = torch.minimum(p[0], q[0]).sum().item()
    accepted = sum(len(e) > 1 for e in emitted) / len(emitted)
    assert abs(accepted - beta) < 4 * (beta * (1 - beta) / len(emitted)) ** 0.5
    # total variation of the first token from p: sampling noise only, ~sqrt(V / N)
    first = position_counts(emitted, 0, V).double() / len(emitted)
    assert 0.5 * (first - p[0]).abs().sum() < (V / len(emitted)) ** 0.5
    # the test has power: the draft's own proposals (what accepting everything would emit) are clearly not p
    drafts = torch.multinomial(q[0], 5000, replacement=True, generator=torch.Generator().manual_seed(9))
    assert chi2_pvalue(torch.bincount(drafts, minlength=V), p[0]) < 1e-6


def test_verify_is_lossless_edge_cases():
    V = 4
    cases = {
        # the draft likes tokens the target never emits (p(x) = 0), and misses one the target likes
        "p_zero": (torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]]),
                   torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.0, 0.8], [0.1, 0.2, 0.3, 0.4]])),
        # disjoint supports: every draft is rejected, the residual is p itself
        "disjoint": (torch.tensor([[0.0, 0.0, 0.3, 0.7], [0.0, 0.0, 1.0, 0.0]]),
                     torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])),
        # p == q: everything is accepted, then the bonus comes from the last row
        "p_equals_q": (torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]),
                       torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.0, 0.5]])),
    }
    for name, (q, p) in cases.items():
        emitted = run_verify(q, p, trials=3000, seed=len(name))
        for k in range(3):
            counts = position_counts(emitted, k, V)
            if counts.sum() > 0:
                assert chi2_pvalue(counts, p[k]) > 1e-4, f"{name}, position {k}"
        if name == "disjoint":
            assert all(len(e) == 1 for e in emitted)
        if name == "p_equals_q":
            assert all(len(e) == 3 for e in emitted)


def test_verify_is_lossless_over_a_sequence():
    """Context-dependent distributions, as in a real decoding loop: the first two emitted tokens (from one round,
    or two rounds when the first draft is rejected) must have the target's joint distribution p(a) p(b | a)."""
    torch.manual_seed(3)
    V, trials = 3, 5000
    P1, P2 = dirichlet(1, V)[0], dirichlet(V, V)  # p(a), p(b | a)
    Q1, Q2 = dirichlet(1, V)[0], dirichlet(V, V)
    P3 = torch.full((V,), 1.0 / V)  # the bonus after two accepted drafts (never looked at here)
    g = torch.Generator().manual_seed(4)
    joint = torch.zeros(V, V, dtype=torch.long)
    for _ in range(trials):
        a = torch.multinomial(Q1, 1, generator=g)
        b = torch.multinomial(Q2[a.item()], 1, generator=g)
        n, t = S.verify(torch.cat([a, b]), torch.stack([Q1, Q2[a.item()]]), torch.stack([P1, P2[a.item()], P3]), g)
        seq = [a.item(), b.item()][:n] + [t]
        if len(seq) == 1:  # next round, drafting one token after the emitted one
            x = torch.multinomial(Q2[t], 1, generator=g)
            n2, t2 = S.verify(x, Q2[t][None], torch.stack([P2[t], P3]), g)
            seq += x[:n2].tolist() + [t2]
        joint[seq[0], seq[1]] += 1
    assert chi2_pvalue(joint.view(-1), (P1[:, None] * P2).view(-1)) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verify_greedy_one_hot_is_exact(dtype):
    V = 6
    onehot = torch.eye(V)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        target_tokens = torch.randint(0, V, (4,), generator=g)  # the target's argmax at each of gamma+1 rows
        draft_tokens = target_tokens[:3].clone()
        for n_expected in range(4):
            drafts = draft_tokens.clone()
            if n_expected < 3:  # first disagreement at position n_expected
                drafts[n_expected] = (target_tokens[n_expected] + 1) % V
            n, t = S.verify(drafts, onehot[drafts], onehot[target_tokens], g, dtype)
            assert (n, t) == (n_expected, target_tokens[n_expected].item())


def test_verify_never_leaves_the_support_when_the_residual_vanishes():
    # p below q everywhere (only float rounding produces this for real): a rejection with an all-zero residual
    q = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    p = torch.tensor([[0.125, 0.125, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.multinomial(q[0], 1, generator=g)
        n, t = S.verify(x, q, p, g)
        assert (n == 1 and t == 1) or (n == 0 and t in (0, 1, 2))


# -----------------------------------------------------------------------------
# the decoding loops, on random tiny models

def test_greedy_speculative_equals_autoregressive_random_draft(tiny_pair):
    target, draft = tiny_pair
    total_accepted = total_drafted = 0
    for prompt in ([5, 17, 42, 9], [1], [3, 4, 60, 2, 2, 7]):
        ref, ref_stats = S.autoregressive(target, prompt, 40, temperature=0)
        assert len(ref) == 40 and ref_stats["target_forwards"] == 40 and ref_stats["block_efficiency"] == 1.0
        for gamma in (1, 2, 4, 7):
            out, st = S.generate(target, draft, prompt, 40, gamma=gamma, temperature=0)
            assert out == ref, (prompt, gamma)
            assert st["new_tokens"] == 40 and st["gamma"] == gamma and len(st["accepted_per_position"]) == gamma
            assert st["accepted"] == sum(st["accepted_per_position"])
            assert st["drafted"] == sum(st["drafted_per_position"])
            assert all(a <= d for a, d in zip(st["accepted_per_position"], st["drafted_per_position"]))
            total_accepted += st["accepted"]
            total_drafted += st["drafted"]
        # a run that ends on a stop token: the first occurrence of a token we know the target produces
        stop = ref[25]
        end = ref.index(stop) + 1
        for gamma in (1, 3, 5):
            out, st = S.generate(target, draft, prompt, 40, gamma=gamma, temperature=0, stop_ids={stop})
            assert out == ref[:end] and st["new_tokens"] == end
        out, _ = S.autoregressive(target, prompt, 40, temperature=0, stop_ids={stop})
        assert out == ref[:end]
    assert 0.2 < total_accepted / total_drafted < 0.95  # the draft is right part of the time: both paths ran


def test_stop_among_accepted_drafts_and_streaming(tiny_pair):
    target, _ = tiny_pair
    prompt = [11, 12, 13]
    ref, _ = S.autoregressive(target, prompt, 30, temperature=0)
    # a stop token that first appears as the 1st-4th token of a 5-token round: among the accepted drafts
    end = next(i + 1 for i in range(5, 25) if ref.index(ref[i]) == i and (i + 1) % 5)
    rounds = []
    out, st = S.generate(target, target, prompt, 30, gamma=4, temperature=0, stop_ids={ref[end - 1]},
                         on_tokens=lambda toks, n: rounds.append((list(toks), n)))
    assert out == ref[:end] and sum(len(r) for r, _ in rounds) == end
    assert all(n == len(r) - 1 for r, n in rounds[:-1])  # target as draft: all but the last token came from it
    # accepted and drafted count only what reached the output: the drafts after the stop token are cut away from
    # both, so the target as its own draft keeps alpha = beta = 1 (counting them drafted gave alpha < 1)
    assert st["accepted"] == sum(n for _, n in rounds) == sum(st["accepted_per_position"]) == st["drafted"]
    assert st["drafted"] == sum(st["drafted_per_position"]) < 4 * st["target_forwards"]
    assert st["rejections"] == 0 and st["beta"] == 1.0 == st["acceptance_rate"]


def test_greedy_speculative_equals_autoregressive_trimmed_draft_and_threshold(tiny_pair):
    target, draft = tiny_pair
    head = list(range(0, 64, 2))  # the draft can propose even tokens only
    trimmed = copy.deepcopy(draft).trim_head(head)
    fired = 0
    for prompt in ([5, 17, 42, 9], [3, 4, 60, 2, 2, 7]):
        ref, _ = S.autoregressive(target, prompt, 40, temperature=0)
        assert any(t % 2 for t in ref)  # the target also says tokens the trimmed draft cannot
        for d, threshold in ((trimmed, 0.0), (draft, 0.4), (trimmed, 0.4)):
            for gamma in (2, 5):
                rounds = []
                out, st = S.generate(target, d, prompt, 40, gamma=gamma, temperature=0, draft_threshold=threshold,
                                     on_tokens=lambda toks, n: rounds.append((list(toks), n)))
                assert out == ref, (prompt, gamma, threshold)
                assert st["accepted"] == sum(st["accepted_per_position"]) == sum(n for _, n in rounds) > 0
                assert st["drafted"] == sum(st["drafted_per_position"])
                assert st["beta"] == st["accepted"] / (st["accepted"] + st["rejections"])
                assert st["effective_gamma"] == st["draft_forwards"] / st["target_forwards"] <= gamma
                if d is trimmed:
                    assert all(t in head for toks, n in rounds for t in toks[:n])
                if threshold:  # the rule stopped some rounds early: a draft forward that proposed nothing
                    fired += st["draft_forwards"] > st["drafted"]
                else:
                    assert st["draft_forwards"] == st["drafted"]
    assert fired >= 4


@pytest.mark.parametrize("threshold,top_p,dtype", [(0.0, None, torch.float64), (0.8, 0.9, torch.float32)])
def test_speculative_sampling_with_a_trimmed_draft_is_lossless(threshold, top_p, dtype):
    """A trimmed draft head proposes 3 of 5 tokens; the others still come out at the target's rates (from the
    residual and the bonus token), also with a draft threshold and in float32 sampling (Gaudi, MPS)."""
    V, head = 5, [0, 2, 3]
    target = bigram(0, V)
    draft = perturbed(target, 5, 0.2).trim_head(head)
    with torch.no_grad():
        P = S.sample_probs(target(torch.arange(V)[:, None])[:, -1], 1.0, top_p=top_p)  # (V, V) p(next | last)
    out, st = S.generate(target, draft, [0], 1200, gamma=3, temperature=1.0, top_p=top_p, seed=0,
                         draft_threshold=threshold, dtype=dtype)
    seq = [0] + out
    counts = torch.zeros(V, V, dtype=torch.long)
    for a, b in zip(seq, seq[1:]):
        counts[a, b] += 1
    assert chi2_pvalue(counts, P) > 1e-4
    # power: accepting the draft's tokens only would never emit 1 or 4, which the target says this often
    assert counts[:, [1, 4]].sum() > 100 and st["accepted"] > 100
    if threshold:
        assert st["draft_forwards"] > st["drafted"] and st["effective_gamma"] < 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (0.6, None, None), (0.6, 20, None),
                                                     (0.6, None, 0.9), (1.0, 10, 0.8)])
def test_draft_equal_to_target_accepts_everything(tiny_pair, temperature, top_k, top_p):
    target, _ = tiny_pair
    for gamma in (1, 3, 4):
        n_new = 5 * (gamma + 1)  # whole rounds only: a round clamped by max_new_tokens drafts fewer tokens
        out, st = S.generate(target, target, [7, 8, 9], n_new, gamma=gamma, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=1)
        assert len(out) == n_new
        assert st["acceptance_rate"] == 1.0 and st["block_efficiency"] == gamma + 1
        assert st["accepted_per_position"] == [5] * gamma and st["target_forwards"] == 5
        assert st["c"] == 1.0 and st["mbsu"] == pytest.approx((gamma + 1) / (gamma * 1.0 + 1))
        # a separate copy of the weights (its own KV cache) behaves the same
        _, st2 = S.generate(target, copy.deepcopy(target), [7, 8, 9], n_new + 2, gamma=gamma,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
        assert st2["acceptance_rate"] == 1.0 and st2["new_tokens"] == n_new + 2
        assert st2["target_forwards"] == 6 and st2["drafted"] == 5 * gamma + 1  # the last round drafts 1 token


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts the calls that make a GPU or Gaudi wait for the device (a read of a tensor's values on the host) or
    for a host-to-device copy (torch.tensor from Python data); the CPU runs the same code path as cuda and hpu."""
    calls = []
    for owner, names in ((torch.Tensor, ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                                         "__index__")), (torch, ("tensor", "as_tensor"))):
        for name in names:
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                       _real(*a, **kw))[1])
    return calls


@pytest.mark.parametrize("temperature,trim", [(0.0, False), (0.8, True)])
def test_one_host_sync_a_round(tiny_pair, host_syncs, temperature, trim):
    """With a fixed gamma a round reads its tokens back once (after verify), and the run uploads its prompt once:
    no torch.tensor per round, no .item() per draft token, no sync to map a trimmed head's tokens."""
    target, draft = tiny_pair
    if trim:
        draft = copy.deepcopy(draft).trim_head(list(range(0, 64, 2)))
    for prompt in ([5, 17, 42, 9], [3, 4, 60, 2, 2, 7, 1, 1, 30]):
        host_syncs.clear()
        out, st = S.generate(target, draft, prompt, 30, gamma=3, temperature=temperature, seed=0)
        assert len(out) == 30 and st["target_forwards"] >= 8
        assert host_syncs.count("tolist") == st["target_forwards"] and len(host_syncs) <= st["target_forwards"] + 1
        host_syncs.clear()
        S.autoregressive(target, prompt, 12, temperature=temperature, seed=0)
        assert len(host_syncs) <= 12 + 1, host_syncs  # one read a token (on_token needs it), one upload


def test_compiled_decoding_reuses_its_caches_and_graphs_across_prompts():
    """A proxy for Gaudi and CUDA graphs (see tests/test_model.py): two prompts of different lengths, speculative
    and plain, compiled with static shapes, build one graph per forward shape, not one per token or per prompt:
    the KV caches are allocated once (a power-of-two length) and prompts padded to the 64-slot read bucket."""
    from torch._dynamo.testing import CompileCounter
    target = random_model(0)
    draft = shallow_copy(target, 1)
    prompts, gamma = ([5, 17, 42, 9], [3, 4, 60, 2, 2, 7, 1, 1, 30, 8, 8]), 2
    refs = [S.generate(target, draft, p, 30, gamma=gamma, temperature=0)[0] for p in prompts]
    torch._dynamo.reset()
    counter = CompileCounter()
    for m in (target, draft):
        m.compile_blocks(64, backend=counter, dynamic=False)
    caches = [m.layers[0].self_attn.k_cache for m in (target, draft)]
    for prompt, ref in zip(prompts, refs):
        assert S.generate(target, draft, prompt, 30, gamma=gamma, temperature=0)[0] == ref
        S.autoregressive(target, prompt, 10, temperature=0)
    # the prefills (one bucket), the target at 1..gamma+1 tokens, the draft at 1 or 2: none per prompt
    assert counter.frame_count <= gamma + 5, counter.frame_count
    assert all(m.layers[0].self_attn.k_cache is c for m, c in zip((target, draft), caches))
    torch._dynamo.reset()


def test_seeded_sampling_is_reproducible_and_max_new_tokens_exact(tiny_pair):
    target, draft = tiny_pair
    prompt = [2, 3, 5, 7]
    for n_new in (1, 2, 13):
        for gamma in (1, 3, 6):
            a, sa = S.generate(target, draft, prompt, n_new, gamma=gamma, temperature=0.8, top_k=30, seed=123)
            b, _ = S.generate(target, draft, prompt, n_new, gamma=gamma, temperature=0.8, top_k=30, seed=123)
            assert a == b and len(a) == n_new == sa["new_tokens"]
        c, _ = S.autoregressive(target, prompt, n_new, temperature=0.8, seed=5)
        d, _ = S.autoregressive(target, prompt, n_new, temperature=0.8, seed=5)
        assert c == d and len(c) == n_new
    runs = {tuple(S.generate(target, draft, prompt, 20, temperature=1.0, seed=s)[0]) for s in range(4)}
    assert len(runs) > 1  # different seeds give different samples


# -----------------------------------------------------------------------------
# SmolLM2 as the target (fp32, loaded once for the module)

def test_greedy_speculative_equals_autoregressive_smollm2(smollm2):
    # token counts stay small: a SmolLM2 forward is ~20 ms on one free CPU core, far more on a busy one
    target = smollm2
    draft = shallow_copy(target, 4)  # the target's first 4 of 30 blocks: right some of the time
    rand_draft = random_model(0, vocab_size=target.config.vocab_size, n_layers=1, dim=32)
    prompts = [[1604, 3987, 24, 94, 727],  # "def fib(n):"
               [504, 3458, 282, 4649, 314]]
    accepted = drafted = 0
    for i, prompt in enumerate(prompts):
        ref, _ = S.autoregressive(target, prompt, 24, temperature=0)
        for d, gamma, n in ((draft, 3, 24), (draft, 5, 24) if i else (rand_draft, 2, 10)):
            out, st = S.generate(target, d, prompt, n, gamma=gamma, temperature=0)
            assert out == ref[:n], (prompt, gamma)  # greedy: a shorter run is a prefix of the longer one
            if d is draft:
                accepted, drafted = accepted + st["accepted"], drafted + st["drafted"]
        stop = ref[10]  # a run that ends on a "stop" token the target is known to produce
        out, st = S.generate(target, draft, prompt, 24, gamma=4, temperature=0, stop_ids={stop})
        assert out == ref[: ref.index(stop) + 1]
    assert 0 < accepted < drafted


def test_shipped_draft_is_smollm2s_default_and_decodes_exactly(smollm2, smollm2_tok):
    """drafts/smollm2-135m is what speculative.py and bench.py use for SmolLM2 without --draft: the target's
    vocabulary, a trimmed head that keeps the stop tokens, and greedy SD == AR with it in float32."""
    path = checkpoint.default_draft("smollm2")
    draft = checkpoint.load_model(path)
    assert draft.config.vocab_size == smollm2.config.vocab_size
    assert tokenizer.load_tokenizer(path).fingerprint() == smollm2_tok.fingerprint()
    ids = set(draft.head_ids.tolist())
    assert len(ids) == len(draft.head_ids) < draft.config.vocab_size and smollm2_tok.stop_ids <= ids
    assert draft.num_params() < smollm2.num_params() / 5
    prompt = smollm2_tok.chat([{"role": "user", "content": "Write a Python function that reverses a string."}])
    ar, _ = S.autoregressive(smollm2, prompt, 24, temperature=0.0)
    sd, stats = S.generate(smollm2, draft, prompt, 24, gamma=3, temperature=0.0)
    assert sd == ar and stats["accepted"] > 0


def test_bfloat16_speculative_decoding_is_exact_up_to_rounding(smollm2):
    """What exactness means in bf16. verify() is exact for the p it is given; in bf16 the target's p for a token
    scored inside a (gamma+1)-token forward differs from the one-token forward's by rounding (bf16 keeps 8 bits
    of mantissa; the two shapes run different kernels with other summation orders, which differ between CPUs).
    The bars are measured against float32 here: both bf16 shapes are equally close to it (a bug in one shape
    would not be), and greedy SD leaves the one-token loop's tokens only at a near tie rounding can flip."""
    target = copy.deepcopy(smollm2).to(torch.bfloat16)
    prompt = [504, 3575, 282, 4649, 314]   # "The capital of France is"

    def one_token_and_chunk(m, tokens=None):   # (40, V) logits of 40 one-token steps and of the same in one chunk
        with torch.no_grad():
            m.setup_cache(1, 64)
            steps = [m(torch.tensor([prompt]), input_pos=0, last_n=1)[0, -1]]
            tokens = tokens or []
            for t in range(40):
                if len(tokens) == t:   # greedy, unless the tokens are given
                    tokens.append(int(steps[-1].argmax()))
                steps.append(m(torch.tensor([[tokens[t]]]), input_pos=len(prompt) + t)[0, -1])
            m.setup_cache(1, 64)   # the verify forward's shape
            chunk = m(torch.tensor([prompt + tokens]), input_pos=0)[0, len(prompt) - 1:-1]
        return torch.stack(steps[:-1]).float(), chunk.float(), tokens

    steps, chunk, ar = one_token_and_chunk(target)
    ref, ref_chunk, _ = one_token_and_chunk(smollm2, list(ar))
    assert (ref - ref_chunk).abs().max() < 1e-3                  # float32: one function, whatever the shape
    err_steps, err_chunk = (steps - ref).abs().mean(), (chunk - ref).abs().mean()
    assert err_steps > 1e-3 and err_chunk > 1e-3                  # bf16 really rounds
    assert err_chunk < 2 * err_steps and err_steps < 2 * err_chunk
    rounding = (steps - chunk).abs().max().item()
    assert ar == S.autoregressive(target, prompt, 40, temperature=0.0)[0]
    sd, stats = S.generate(target, target, prompt, 40, gamma=3, temperature=0.0)
    assert stats["acceptance_rate"] > 0.8
    first = next((i for i, (a, b) in enumerate(zip(ar, sd)) if a != b), None)
    if first is not None:   # the first difference sits where the one-token logits nearly tie
        top2 = steps[first].topk(2).values
        assert top2[0] - top2[1] <= 2 * rounding


def test_smollm2_as_its_own_draft_accepts_everything(smollm2):
    for temperature, top_p in ((0.0, None), (0.6, 0.95)):
        out, st = S.generate(smollm2, smollm2, [1604, 3987, 24, 94, 727], 12, gamma=3, temperature=temperature,
                             top_p=top_p, seed=0)
        assert len(out) == 12 and st["acceptance_rate"] == 1.0 and st["block_efficiency"] == 4.0


def test_metrics():
    small, big = random_model(0, n_layers=1, dim=32), random_model(0, n_layers=2, dim=64)
    c = S.cost_ratio(small, big)
    assert c["c"] == small.num_params() / big.num_params()
    assert c["c_non_embedding"] == small.num_params(non_embedding=True) / big.num_params(non_embedding=True)
    assert S.mbsu(3.0, 3, 0.1) == pytest.approx(3.0 / 1.3)
    assert S.mbsu(1.0, 5, 0.0) == 1.0


# -----------------------------------------------------------------------------
# bad input

def test_bad_input_is_a_clear_error(tiny_pair, monkeypatch):
    target, draft = tiny_pair
    other_vocab = random_model(2, vocab_size=65)
    with pytest.raises(common.UserError, match="vocabulary mismatch: .* 64 tokens, the draft has 65"):
        S.generate(target, other_vocab, [1, 2], 5)

    def tok(fingerprint):  # the same size, other token strings: what the CLI's tokenizer check refuses
        return types.SimpleNamespace(spec=fingerprint, vocab_size=64, fingerprint=lambda: fingerprint)
    with pytest.raises(common.UserError, match="other tokens"):
        tokenizer.check_same_vocab(tok("a"), tok("b"))
    tokenizer.check_same_vocab(tok("a"), tok("a"))

    with pytest.raises(common.UserError, match="gamma"):
        S.generate(target, draft, [1, 2], 5, gamma=0)
    with pytest.raises(common.UserError, match="draft_threshold"):
        S.generate(target, draft, [1, 2], 5, draft_threshold=1.5)
    with pytest.raises(common.UserError, match="target's head is trimmed"):
        S.generate(copy.deepcopy(target).trim_head([1, 2, 3]), draft, [1, 2], 5)
    monkeypatch.setattr(common, "hpu_lazy", lambda: True)
    with pytest.raises(common.UserError, match="eager mode"):  # Gaudi's lazy mode has no torch.compile
        S.compile_models(torch.device("hpu"), target)
    with pytest.raises(common.UserError, match="temperature"):
        S.generate(target, draft, [1, 2], 5, temperature=-0.1)
    with pytest.raises(common.UserError, match="temperature"):
        S.autoregressive(target, [1, 2], 5, temperature=-1)
    for top_p in (0.0, 1.5, -0.2):
        with pytest.raises(common.UserError, match="top_p"):
            S.generate(target, draft, [1, 2], 5, top_p=top_p)
    with pytest.raises(common.UserError, match="empty"):
        S.generate(target, draft, [], 5)
    with pytest.raises(common.UserError, match="empty"):
        S.autoregressive(target, [], 5)


def test_context_check_counts_what_a_run_writes():
    """A run writes the prompt and its new tokens but the last (sampled, never fed) into the caches; the drafts
    never reach past max_new_tokens. So both loops take prompt + max_new_tokens - 1 <= context and no more: a
    60-token prompt and 4 new tokens in a 64-token context decode speculatively too (once refused there)."""
    target = random_model(0)
    target.config = dataclasses.replace(target.config, max_seq_len=64)
    draft = perturbed(target, 1, 0.01)
    draft.config = target.config
    for prompt_len in (60, 61):
        ref, _ = S.autoregressive(target, [1] * prompt_len, 65 - prompt_len, temperature=0)
        for gamma in (1, 3, 6):
            out, _ = S.generate(target, draft, [1] * prompt_len, 65 - prompt_len, gamma=gamma, temperature=0)
            assert out == ref and len(out) == 65 - prompt_len
    for run in (lambda: S.autoregressive(target, [1] * 61, 5), lambda: S.generate(target, draft, [1] * 61, 5)):
        with pytest.raises(common.UserError, match="need 65 positions, more than a model's context of 64"):
            run()


@pytest.mark.parametrize("script,args,message", [
    ("speculative.py", ["--target", "{tmp}/a", "--draft", "{tmp}/b", "--device", "cpu"],
     "error: vocabulary mismatch: the target has 64 tokens, the draft has 80; train the draft with the target's"),
    ("bench.py", ["--draft", "x", "--tasks", "poetry"], "error: unknown task 'poetry'")], ids=["speculative", "bench"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, script, args, message):
    """The real process: a user's mistake is one line on stderr and exit code 2, not a traceback."""
    for name, vocab_size in (("a", 64), ("b", 80)):  # two saved models, small so they load fast
        checkpoint.save_model(random_model(0, vocab_size=vocab_size), str(tmp_path / name))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *(a.format(tmp=tmp_path) for a in args)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cli_compare_times_a_silent_run_and_reports_both(tmp_path, monkeypatch, capsys, cpu_bf16):
    """--compare: silent timed runs, both texts shown afterwards; with --dtype auto on a CPU with bf16 units each
    job runs in the dtype measured fastest for it (here: bf16 for the rounds, fp32 for plain decoding, as on an
    Intel CPU with AMX), and the speedup is quoted against the fastest plain decoding and the same dtype's."""
    # a tiny model in SmolLM2's vocabulary, so the real tokenizer is used; as its own draft it shares one cache
    m = tiny_model(0, vocab_size=49152, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, bos_id=1,
                   eos_id=2, tokenizer="smollm2")
    checkpoint.save_model(m, str(tmp_path / "m"))
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: cpu_bf16)  # --dtype auto: measured where it has bf16
    monkeypatch.setenv("FASTDRAFT_CACHE", str(tmp_path / "cache"))
    costs = {torch.float32: (1.0, 3.0, 6.0), torch.bfloat16: (0.5, 3.3, 3.4)}  # draft step, target 1, target 4
    monkeypatch.setattr(S, "step_costs", lambda t, d, p, g, repeats=7: dict(zip(
        ("t_draft", "t_target_1", "t_target_gamma1"), costs[next(t.parameters()).dtype])))
    compiled = []  # --compile, without the minutes of a real compile: the target as its own draft, once
    monkeypatch.setattr(M.Transformer, "compile_blocks", lambda self, **kw: compiled.append(self) or self)
    printed, during = [], []  # what stdout got outside and inside each generate() call
    real_generate = S.generate

    def spy(*a, **kw):
        printed.append(capsys.readouterr().out)
        out = real_generate(*a, **kw)
        during.append(capsys.readouterr().out)
        return out
    monkeypatch.setattr(S, "generate", spy)
    monkeypatch.setattr(sys, "argv", ["speculative.py", "--target", str(tmp_path / "m"), "--draft",
                                      str(tmp_path / "m"), "--temperature", "0", "--max-new-tokens", "6",
                                      "--draft-threshold", "0",   # a random model's flat q would draft nothing
                                      "--device", "cpu", "--compare", "--compile", "--json", str(tmp_path / "r.json"),
                                      "--prompt", "Once upon a time"])
    S.main()
    out = "".join(printed) + capsys.readouterr().out
    measured = out.startswith("dtype auto (measured now")   # one line on how the dtypes were chosen, before
    out = out.split("\n", 1)[1] if measured else out
    with open(tmp_path / "r.json") as f:
        r = json.load(f)
    spec, base = r["speculative"], r["autoregressive"]
    assert during == ["", ""] and len(compiled) == 1 + cpu_bf16  # the warm-up and the timed run wrote nothing
    assert out.startswith("Once upon a time") and len(out.split("speculative:")[0].strip()) > 16  # shown after
    assert r["dtype"] == ("bfloat16" if cpu_bf16 else "float32") and spec["new_tokens"] == base["new_tokens"]
    assert r["dtypes"]["autoregressive"] == "float32" and measured == cpu_bf16
    same = r["autoregressive_same_dtype"]
    assert r["speedup_same_dtype"] == pytest.approx(same["seconds"] / same["new_tokens"] * spec["new_tokens"]
                                                    / spec["seconds"])
    assert r["speedup"] <= r["speedup_same_dtype"]   # quoted against the faster plain run: the smaller figure
    assert ("autoregressive: 6 tokens" in out) and ("in float32" in out) and ("in bfloat16" in out) == cpu_bf16
    assert "autoregressive text:\nOnce upon a time" in out
    assert spec["c"] == 1.0 and spec["effective_gamma"] == spec["draft_forwards"] / spec["target_forwards"]
    assert spec["beta"] == spec["accepted"] / (spec["accepted"] + spec["rejections"])
    if not cpu_bf16:  # float32: the target agrees with itself exactly (bf16: see README, exactness in bf16)
        assert spec["acceptance_rate"] == 1.0 == spec["beta"]
    per_token = base["seconds"] / base["new_tokens"], spec["seconds"] / spec["new_tokens"]
    assert r["speedup"] == pytest.approx(per_token[0] / per_token[1])
    assert "autoregressive:" in out and f"wall-clock speedup {r['speedup']:.2f}x" in out


def test_cli_checks_its_flags_before_loading_models(tmp_path, monkeypatch):
    for args, words in ((["--prompt", ""], "empty"), (["--top-p", "0"], "top_p"), (["--top-p", "1.01"], "top_p"),
                        (["--temperature", "-1"], "temperature"), (["--gamma", "-2"], "gamma"),
                        (["--draft-threshold", "2"], "draft_threshold"),
                        (["--draft", str(tmp_path / "missing")], "no such model")):
        monkeypatch.setattr(sys, "argv", ["speculative.py", "--draft", "smollm2", *args])
        with pytest.raises(common.UserError, match=words):
            S.main()
