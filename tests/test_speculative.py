"""Speculative decoding is exact: verify() is lossless, greedy speculative output equals greedy autoregressive
output, the target as its own draft accepts everything, and bad input is a clear error."""
import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import common
import model as M
import speculative as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# helpers

def chi2_pvalue(counts, probs):
    """Pearson chi-square goodness of fit of integer counts (K,) to probabilities (K,). Cells with probability 0
    must be empty: a single token there is a hard failure, not noise."""
    counts, probs = counts.double(), probs.double() / probs.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, f"tokens emitted where p = 0: {counts}"
    n = counts.sum()
    expected = n * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2).item()  # P(X2 >= stat)


def run_verify(q, p, trials, seed=0):
    """Draw x_i ~ q_i and call verify `trials` times; returns the list of emitted token lists."""
    g = torch.Generator().manual_seed(seed)
    gamma = q.size(0)
    out = []
    for _ in range(trials):
        x = torch.multinomial(q, 1, generator=g).view(gamma)
        n, t = S.verify(x, q, p, g)
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


def random_model(seed, vocab_size=64, n_layers=2, dim=64, max_seq_len=256):
    """A tiny random model with untied embeddings and large weights, so its greedy outputs are varied (with a
    small tied init, every random model just repeats its input token)."""
    torch.manual_seed(seed)
    cfg = M.ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        max_seq_len=max_seq_len, tie_embeddings=False)
    m = M.Transformer(cfg).eval()
    with torch.no_grad():
        for w in m.parameters():
            if w.dim() == 2:
                w.normal_(0.0, 0.3)
    return m


def perturbed(m, seed, scale):
    """A draft that agrees with m part of the time: m's weights plus noise."""
    torch.manual_seed(seed)
    d = copy.deepcopy(m)
    with torch.no_grad():
        for w in d.parameters():
            if w.dim() == 2:
                w.add_(torch.randn_like(w) * scale)
    return d


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 decoding is latency-bound: on a small shared machine, two threads spin-waiting for each other
    make every forward ~30x slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_pair():
    target = random_model(0)
    return target, perturbed(target, 1, 0.01)  # accepts about half of its greedy drafts


@pytest.fixture(scope="module")
def smollm2():
    try:
        return checkpoint.load_model("smollm2")
    except common.UserError as e:
        pytest.skip(str(e))


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


def test_sample_draws_from_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.5, 0.0, 1.5, 2.0])  # unnormalised on purpose
    draws = S.sample(w.expand(20000, 4).contiguous(), g)
    assert chi2_pvalue(torch.bincount(draws, minlength=4), w) > 1e-4
    assert S.sample(torch.tensor([0.0, 0.0, 1.0, 0.0]), g).item() == 2  # one-hot: always the hot token


# -----------------------------------------------------------------------------
# verify is lossless

@pytest.mark.parametrize("gamma", [1, 3])
def test_verify_is_lossless_random_distributions(gamma):
    torch.manual_seed(gamma)
    V = 5
    p = dirichlet(gamma + 1, V)
    q = dirichlet(gamma, V)
    emitted = run_verify(q, p, trials=5000, seed=gamma)
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


def test_verify_greedy_one_hot_is_exact():
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
            n, t = S.verify(drafts, onehot[drafts], onehot[target_tokens], g)
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
    stop = ref[9]
    end = ref.index(stop) + 1
    rounds = []
    out, st = S.generate(target, target, prompt, 30, gamma=4, temperature=0, stop_ids={stop},
                         on_tokens=lambda toks, n: rounds.append((list(toks), n)))
    assert out == ref[:end] and sum(len(r) for r, _ in rounds) == end
    assert all(n == len(r) - 1 for r, n in rounds[:-1])  # target as draft: all but the last token came from it
    assert st["acceptance_rate"] == 1.0


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

def test_bad_input_is_a_clear_error(tiny_pair):
    target, draft = tiny_pair
    other_vocab = random_model(2, vocab_size=65)
    with pytest.raises(common.UserError, match="exact vocabulary"):
        S.generate(target, other_vocab, [1, 2], 5)

    class FakeTok:
        def __init__(self, fp):
            self.fp = fp

        def fingerprint(self):
            return self.fp
    with pytest.raises(common.UserError, match="different token strings"):
        S.check_same_vocab(target, draft, FakeTok("a"), FakeTok("b"))
    S.check_same_vocab(target, draft, FakeTok("a"), FakeTok("a"))

    ctx = target.config.max_seq_len  # 256
    with pytest.raises(common.UserError, match="context"):
        S.generate(target, draft, [1] * 200, ctx - 200 - 3, gamma=3)  # 200 + 53 + 3 + 1 > 256
    S.generate(target, draft, [1] * 200, ctx - 200 - 4, gamma=3, temperature=0)  # exactly fits
    with pytest.raises(common.UserError, match="context"):
        S.autoregressive(target, [1] * 200, 57)
    with pytest.raises(common.UserError, match="gamma"):
        S.generate(target, draft, [1, 2], 5, gamma=0)
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


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    # vocabulary mismatch between two saved models (small, so this loads fast)
    checkpoint.save_model(random_model(0, vocab_size=64), str(tmp_path / "a"))
    checkpoint.save_model(random_model(0, vocab_size=80), str(tmp_path / "b"))
    r = run_cli("--target", str(tmp_path / "a"), "--draft", str(tmp_path / "b"), "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: vocabulary mismatch"), r.stderr
    assert "exact vocabulary" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_checks_its_flags_before_loading_models(tmp_path, monkeypatch):
    for args, words in ((["--prompt", ""], "empty"), (["--top-p", "0"], "top_p"), (["--top-p", "1.01"], "top_p"),
                        (["--temperature", "-1"], "temperature"), (["--gamma", "-2"], "gamma"),
                        (["--draft", str(tmp_path / "missing")], "no such model")):
        monkeypatch.setattr(sys, "argv", ["speculative.py", "--draft", "smollm2", *args])
        with pytest.raises(common.UserError, match=words):
            S.main()
