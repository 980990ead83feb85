"""distill.py: batched generation is exact, the data set is sharded and resumable, the losses are right,
training lowers the loss and resumes exactly, bad input is one clear line. Tiny random models; offline; CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import common
import data
import distill
import generation
import synthetic
from conftest import ROOT, tiny_model
from test_pretrain import host_syncs
from train import IGNORE

V = 49152   # the smollm2 tokenizer's vocabulary: tiny models that pass the vocabulary checks
SMALL = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=256, tokenizer="smollm2",
             bos_id=1, eos_id=2)


def tiny(vocab=V, seed=0, **kw):
    return tiny_model(seed, vocab_size=vocab, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny target and a tiny draft (other weights) saved as model folders."""
    root = tmp_path_factory.mktemp("distill")
    checkpoint.save_model(tiny(seed=0), str(root / "target"))
    checkpoint.save_model(tiny(seed=1), str(root / "draft"))
    return root


# -----------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("static", [False, True])
def test_batched_generation_equals_one_row_at_a_time(static, monkeypatch):
    # untied head, big weights: a random model whose greedy tokens depend on the context
    m = tiny(vocab=97, seed=1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=False,
             weight_std=0.3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 5)]
    alone = [generation.generate_batch(m, [p], 10, temperature=0)[0][0] for p in prompts]
    batched, stopped, _ = generation.generate_batch(m, prompts, 10, temperature=0, static=static)
    assert batched == alone and not any(stopped) and all(len(set(a)) > 3 for a in alone)
    # per-row stop: a token that row 1 emits third ends row 1 there and changes no other row's tokens
    # (finished rows leave the batch: the cache keeps only the live rows, and the others must not notice)
    stop = alone[1][2]
    cut = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    kept, keep_rows, caches = [], m.keep_cache_rows, []
    monkeypatch.setattr(m, "keep_cache_rows", lambda rows, length: (kept.append(list(rows)), keep_rows(rows, length)))
    monkeypatch.setattr(m, "setup_cache", lambda B, S, f=m.setup_cache: (caches.append(S), f(B, S)))
    batched, stopped, _ = generation.generate_batch(m, prompts, 10, temperature=0, stop_ids={stop}, static=static)
    monkeypatch.undo()
    assert batched == cut and stopped[1] and len(batched[1]) <= 3
    assert kept and all(len(rows) < len(prompts) for rows in kept)
    if static:   # static shapes: a prompt bucket and power-of-two batches only
        assert caches == [generation.PROMPT_BUCKET + 10] and all(len(rows) in (1, 2, 4) for rows in kept)
    assert [generation.generate_batch(m, [p], 10, temperature=0, stop_ids={stop})[0][0] for p in prompts] == cut


def test_text_prompts_are_openings_of_training_passages(smollm2_tok):
    prompts, _ = synthetic.read_prompt_sources("text:builtin:prose:6", smollm2_tok)
    assert len(prompts) == 6 and {p["kind"] for p in prompts} == {"text"}
    heldout = list(data.read_documents("builtin:prose", split="val"))
    for p in prompts:
        ids = synthetic.encode_prompt(smollm2_tok, p)
        assert ids == smollm2_tok.encode(p["text"]) and len(ids) <= synthetic.TEXT_TOKENS[1]   # raw text, no template
        assert p["text"][0].isalpha() and not any(p["text"] in d for d in heldout)


def test_user_turn_prefix_is_the_chat_templates(smollm2_tok):
    prefix = generation.user_turn_prefix(smollm2_tok)
    assert smollm2_tok.decode(prefix).endswith("<|im_start|>user\n")
    assert smollm2_tok.chat([{"role": "user", "content": "hello"}])[:len(prefix)] == prefix


def test_code_prompts_are_def_lines_with_docstrings():
    prompts = synthetic.code_prompts("code:builtin:code:5", 0)
    assert len(prompts) == 5
    for p in prompts:
        assert p.lstrip().startswith(("def ", "async def ")) and ('"""' in p or "'''" in p) and p.endswith("\n")


def write_prompts(path):
    humaneval_prompt = next(iter(p for p in synthetic.evaluation_prompts() if p.startswith("from typing")))
    rows = [{"instruction": f"Tell me fact number {i} about {w}."} for i, w in enumerate(["cats", "dogs", "rain",
                                                                                         "tea", "sand", "ice",
                                                                                         "owls"])]
    rows.append({"prompt": "Write a limerick about a kettle."})
    rows.append({"instruction": "Explain why the sky looks blue during the day but orange at sunset."})  # bench
    rows.append({"prompt": humaneval_prompt})                                                           # HumanEval
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 8


def shard_rows(out):
    rows = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("shard-"):
            with open(os.path.join(out, name)) as f:
                rows[name] = [json.loads(line) for line in f]
    return rows


def test_generation_is_sharded_and_resumable(folders, smollm2_tok, tmp_path):
    target = checkpoint.load_model(str(folders / "target"))
    n_prompts = write_prompts(tmp_path / "p.jsonl")
    kw = dict(prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "gen"), target_spec="t", temperatures=(0, 1),
              batch_size=3, max_new_tokens=3, max_prompt_tokens=128, log=lambda *a: None)
    m0 = generation.generate_dataset(target, smollm2_tok, rank=0, world_size=2, **kw)
    assert m0["counts"]["dropped_eval"] == 2   # the benchmark's instruction and HumanEval's prompt never get in
    generation.generate_dataset(target, smollm2_tok, rank=1, world_size=2, **kw)
    rows = shard_rows(tmp_path / "gen")
    by_rank = [{r["unit"] for name, rs in rows.items() if name.startswith(f"shard-r{k}-") for r in rs} for k in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]       # disjoint shares, both non-empty
    got = sorted((r["prompt"], r["temperature"]) for rs in rows.values() for r in rs)
    assert len(got) == len(set(got)) == 2 * n_prompts                      # every prompt at every temperature
    r = rows[sorted(rows)[0]][0]
    assert r["prompt_ids"] == smollm2_tok.chat([{"role": "user", "content": r["prompt"]}])
    assert smollm2_tok.decode([i for i in r["completion_ids"] if i not in smollm2_tok.stop_ids]) == r["completion"]

    mtimes = {n: os.path.getmtime(tmp_path / "gen" / n) for n in rows}
    for rank in (0, 1):
        m = generation.generate_dataset(target, smollm2_tok, rank=rank, world_size=2, **kw)
    assert shard_rows(tmp_path / "gen") == rows                            # a rerun adds nothing
    assert {n: os.path.getmtime(tmp_path / "gen" / n) for n in rows} == mtimes
    assert m["counts"]["examples"] == 2 * n_prompts and m["counts"]["units_done"] == m["counts"]["units_total"]
    with pytest.raises(common.UserError, match="other settings"):
        generation.generate_dataset(target, smollm2_tok, **{**kw, "max_new_tokens": 4})


# -----------------------------------------------------------------------------
# the losses

def test_loss_mask_is_completion_only():
    x, y = synthetic.completion_row([10, 11, 12], [20, 21], seq_len=64)
    assert x == [10, 11, 12, 20] and y == [IGNORE, IGNORE, 20, 21]
    rows = [synthetic.completion_row([5, 6, 7, 8], [9, 3], 64), synthetic.completion_row([4], [7, 8, 9], 64)]
    xb, yb = synthetic.pad_rows(rows)
    assert (yb != IGNORE).sum().item() == 5                                # 2 + 3 completion tokens, nothing else
    m = tiny(vocab=97)
    logits = m(xb)
    keep = yb != IGNORE
    want = F.cross_entropy(logits[keep], yb[keep])
    assert torch.allclose(distill.make_loss_fn(None, "ce")(m, xb, yb), want, atol=1e-5)
    # rows padded to a fixed length (cuda / hpu: one shape for every batch) score the same tokens
    xf, yf = synthetic.pad_rows(rows, length=16)
    assert xf.shape == yf.shape == (2, 16) and torch.equal(yf[:, :yb.size(1)], yb)
    assert (yf[:, yb.size(1):] == IGNORE).all()
    assert torch.allclose(distill.make_loss_fn(None, "ce")(m, xf, yf), want, atol=1e-5)


def test_batches_resume_exactly_and_split_across_ranks():
    rows = [synthetic.completion_row([1, 2], [3 + i, 4], 16) for i in range(10)]
    a = synthetic.CompletionBatches(rows, 3, seed=1)
    seen = [next(a) for _ in range(5)]                                     # crosses an epoch boundary
    b = synthetic.CompletionBatches(rows, 3, seed=1)
    for _ in range(2):
        next(b)
    c = synthetic.CompletionBatches(rows, 3, seed=1)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in seen[2:]:
        got = next(c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    r0, r1 = (synthetic.CompletionBatches(rows, 3, seed=1, rank=r, world_size=2) for r in (0, 1))
    x0, x1 = next(r0)[0], next(r1)[0]
    assert {tuple(r) for r in x0.tolist()}.isdisjoint({tuple(r) for r in x1.tolist()})


@pytest.mark.parametrize("loss", ["kl", "tvd", "ce+kl", "ce+tvd"])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
def test_token_level_losses_vanish_when_distributions_agree(loss, top_k, kd_temperature):
    g = torch.Generator().manual_seed(0)
    target_logits = 3 * torch.randn(6, 50, generator=g)
    y = torch.randint(0, 50, (6,), generator=g)
    same = target_logits.clone()
    if top_k:   # the draft equal to the truncated, renormalised target: zero outside the top-k
        kth = target_logits.topk(top_k, dim=-1).values[:, -1:]
        same = target_logits.masked_fill(target_logits < kth, float("-inf"))
    total, parts = distill.distill_loss(same, y, target_logits, loss, kd_temperature, top_k)
    parts = {k: v.item() for k, v in parts.items()}
    assert abs(parts["kd"]) < 1e-5
    ce = F.cross_entropy(same, y).item()
    assert total.item() == pytest.approx(ce if loss.startswith("ce+") else 0.0, abs=1e-5)
    other = target_logits + torch.randn(6, 50, generator=g)
    total, parts = distill.distill_loss(other, y, target_logits, loss, kd_temperature, top_k)
    parts = {k: v.item() for k, v in parts.items()}
    assert parts["kd"] > 1e-3
    assert total.item() == pytest.approx(parts["kd"] + (parts["ce"] if loss.startswith("ce+") else 0), rel=1e-5)


@pytest.mark.parametrize("loss", distill.LOSSES)
def test_losses_have_fixed_shapes_and_padding_changes_nothing(loss):
    # Gaudi compiles one graph per shape: no loss may index with a mask or read a value back to the host
    target, draft = tiny(vocab=97), tiny(vocab=97, seed=3).trim_head(list(range(20, 97)))
    rows = [synthetic.completion_row([5, 6, 7], [9, 30, 4], 64), synthetic.completion_row([4], [50, 60, 70, 2], 64)]
    fn, batch = distill.make_loss_fn(target, loss), synthetic.pad_rows(rows)
    with host_syncs() as calls:
        short = fn(draft, *batch)
        short.backward()
    assert calls == []
    # rows padded to a fixed length (cuda / hpu) score the same tokens: padding is masked, not dropped
    assert fn(draft, *synthetic.pad_rows(rows, length=16)).item() == pytest.approx(short.item(), abs=1e-6)


def test_token_level_loss_against_itself_is_zero_through_the_model():
    m = tiny(vocab=97)
    xb, yb = synthetic.pad_rows([synthetic.completion_row([5, 6, 7], [9, 3, 4], 64)])
    assert distill.make_loss_fn(m, "kl")(m, xb, yb).item() == pytest.approx(0, abs=1e-6)
    assert distill.make_loss_fn(m, "tvd")(m, xb, yb).item() == pytest.approx(0, abs=1e-6)
    assert distill.make_loss_fn(tiny(vocab=97, seed=3), "kl")(m, xb, yb).item() > 0


def test_kd_of_a_trimmed_copy_of_the_target_is_zero_on_its_subset():
    m = tiny(vocab=97)
    trimmed = tiny(vocab=97).trim_head(list(range(40, 80)))
    xb, yb = synthetic.pad_rows([synthetic.completion_row([5, 6, 7], [50, 3, 60, 70], 64)])
    for loss in ("kl", "tvd"):   # the target restricted to the 40 ids and renormalised is exactly the copy's q
        assert distill.make_loss_fn(m, loss)(trimmed, xb, yb).item() == pytest.approx(0, abs=1e-6)
    # ce+kl: the cross-entropy part scores the targets inside the subset only (50, 60, 70; not 3)
    logp = torch.log_softmax(m(xb)[0, 2:, 40:80], dim=-1)                               # predicts 50, 3, 60, 70
    want = -(logp[0, 10] + logp[2, 20] + logp[3, 30]) / 3
    assert distill.make_loss_fn(m, "ce+kl")(trimmed, xb, yb).item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("loss", ["kl", "tvd", "ce+tvd"])
@pytest.mark.parametrize("trimmed", [False, True])
def test_stored_top_k_loss_equals_the_live_teacher_loss(loss, trimmed):
    # the top-k the target stores while it writes the data is what a live target pass would give the loss
    target = tiny(vocab=97, seed=1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=False)
    with torch.no_grad():
        target.lm_head.weight.mul_(20)   # peaked distributions: a top-k truncation that matters
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    outs, _, top = generation.generate_batch(target, prompts, 8, temperature=1.0,
                                          generator=torch.Generator().manual_seed(0), store_top_k=6)
    draft = tiny(vocab=97, seed=3)
    if trimmed:   # a head holding every stored token (and others): the stored ids map to head positions
        draft.trim_head(sorted({i for t in top for ids in t[0] for i in ids} | set(range(0, 97, 3))))
    # stored: the 6 largest log-probs of the distribution each token was drawn from, at temperature 1
    with torch.no_grad():
        full = target(torch.tensor([prompts[0] + outs[0]]))[0].log_softmax(-1)        # (T, V)
    want = full[len(prompts[0]) - 1:len(prompts[0]) - 1 + len(outs[0])].topk(6, dim=-1)
    assert top[0][0] == want.indices.tolist()
    assert torch.tensor(top[0][1]) == pytest.approx(want.values, abs=1e-3)
    assert outs[0][0] in top[0][0][0] and len(top[1][0]) == len(outs[1])

    rows = [synthetic.completion_row(p, c, 64, t) for p, c, t in zip(prompts, outs, top)]
    batch = synthetic.pad_rows(rows)
    assert [b.shape for b in batch[2:]] == [(2, 12, 6), (2, 12, 6)]
    stored = distill.make_loss_fn(None, loss, top_k=None)(draft, *batch)
    live = distill.make_loss_fn(target, loss, top_k=6)(draft, *batch[:2])
    assert stored.item() == pytest.approx(live.item(), abs=2e-3)                     # log-probs rounded to 1e-3
    other = distill.make_loss_fn(target, loss, top_k=None)(draft, *batch[:2])
    assert abs(other.item() - stored.item()) > 1e-3                                # the truncation is real
    # padding rows to a fixed length changes nothing, and no step reads back to the host
    fixed = synthetic.pad_rows(rows, length=20)
    with host_syncs() as calls:
        padded = distill.make_loss_fn(None, loss)(draft, *fixed)
        padded.backward()
    assert calls == [] and padded.item() == pytest.approx(stored.item(), abs=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_on_policy_batches_are_the_drafts_own_text_and_resume_exactly(static):
    draft = tiny(vocab=97, seed=1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=False)
    draft.trim_head(list(range(10, 97)))   # its samples are vocabulary ids, never positions in its head
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44], [12, 13], [20, 21, 22, 23]]
    kw = dict(max_new_tokens=6, temperatures=[0.0, 1.0], stop_ids=(), seq_len=64, seed=3,
              length=16 if static else None)
    batches = generation.OnPolicyBatches(draft, prompts, 2, **kw)
    x, y = next(batches)                                         # batch 0: greedy, at temperature 0
    for row in range(2):
        completion = [t for t in y[row].tolist() if t != IGNORE]
        assert len(completion) == 6 and all(10 <= t < 97 for t in completion)
        start = (y[row] != IGNORE).nonzero()[0].item() + 1   # the prompt's length
        assert generation.generate_batch(draft, [x[row, :start].tolist()], 6)[0][0] == completion
    state = batches.state_dict()
    nxt = next(batches)                                          # batch 1: sampled, at temperature 1
    again = generation.OnPolicyBatches(draft, prompts, 2, **kw)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(nxt, next(again)))
    fresh = generation.OnPolicyBatches(draft, prompts, 2, **kw)
    next(fresh)
    with torch.no_grad():
        for w in draft.parameters():
            w.mul_(1.5)                                          # the rollouts follow the draft as it is now
    assert not all(torch.equal(a, b) for a, b in zip(nxt, next(fresh)))


# -----------------------------------------------------------------------------
# training and bad input

def write_synthetic(folder, tok, n=24):
    """A learnable synthetic set: the 'target' always answers with the same short sentence."""
    os.makedirs(folder, exist_ok=True)
    answer = tok.encode("The answer is always forty two.") + [2]
    with open(os.path.join(folder, "shard-r0-p00000-t0.jsonl"), "w") as f:
        for i in range(n):
            p = tok.chat([{"role": "user", "content": f"Question {i}?"}])
            f.write(json.dumps({"prompt": f"Question {i}?", "completion": "", "prompt_ids": p,
                                "completion_ids": answer, "temperature": 0}) + "\n")


def test_several_data_folders_are_one_set_without_repeats(smollm2_tok, tmp_path):
    write_synthetic(tmp_path / "a", smollm2_tok, n=24)   # questions 0..23
    write_synthetic(tmp_path / "b", smollm2_tok, n=30)   # questions 0..29: 24 repeats of a, 6 new
    assert len(synthetic.read_synthetic(str(tmp_path / "a"))) == 24
    both = synthetic.read_synthetic(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert len(both) == len(set(map(str, both))) == 30
    with pytest.raises(common.UserError, match="not found: .*missing"):
        synthetic.read_synthetic(f"{tmp_path / 'a'},{tmp_path / 'missing'}")


def test_train_reduces_the_loss(folders, smollm2_tok, tmp_path):
    write_synthetic(tmp_path / "syn", smollm2_tok)
    out = tmp_path / "ft"
    distill.main(["train", "--draft", str(folders / "draft"), "--target", str(folders / "target"),
                  "--data", str(tmp_path / "syn"), "--out", str(out), "--max-steps", "8", "--lr", "3e-2",
                  "--batch-size", "4", "--val-fraction", "0.25", "--eval-every", "0", "--log-every", "100",
                  "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["val_rows"] > 0 and r["step"] == 8
    assert r["val_loss_end"] < r["val_loss_start"] - 0.5
    assert checkpoint.load_model(str(out)).config.vocab_size == V


def test_trim_then_train_keeps_the_targets_most_frequent_tokens(folders, smollm2_tok, tmp_path):
    write_synthetic(tmp_path / "syn", smollm2_tok)
    answer = set(smollm2_tok.encode("The answer is always forty two.") + [2])
    k = 17 + len(answer)   # SmolLM2's 17 special and stop tokens, then every token of the answer
    distill.main(["trim", "--draft", str(folders / "draft"), "--head-vocab", str(k), "--data", str(tmp_path / "syn"),
                  "--out", str(tmp_path / "trimmed")])
    head = checkpoint.load_model(str(tmp_path / "trimmed")).head_ids.tolist()
    assert len(head) == k and answer <= set(head) and set(range(17)) <= set(head)
    with pytest.raises(common.UserError, match="trimmed already"):
        distill.main(["trim", "--draft", str(tmp_path / "trimmed"), "--head-vocab", str(k), "--data",
                      str(tmp_path / "syn"), "--out", str(tmp_path / "again")])
    distill.main(["train", "--draft", str(tmp_path / "trimmed"), "--target", str(folders / "target"), "--data",
                  str(tmp_path / "syn"), "--out", str(tmp_path / "ft"), "--max-steps", "6", "--lr", "3e-2",
                  "--batch-size", "4", "--val-fraction", "0.25", "--eval-every", "0", "--loss", "ce+tvd",
                  "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["head_vocab"] == k and r["losses"][-1] < r["losses"][0] - 0.5
    assert checkpoint.load_model(str(tmp_path / "ft")).head_ids.tolist() == head
    with pytest.raises(common.UserError, match="needs 17 <= k"):
        distill.main(["train", "--draft", str(folders / "draft"), "--data", str(tmp_path / "syn"), "--target",
                      str(folders / "target"), "--head-vocab", "3", "--out", str(tmp_path / "bad")])


def test_train_resumes_exactly(folders, smollm2_tok, tmp_path):
    write_synthetic(tmp_path / "syn", smollm2_tok)
    argv = ["train", "--draft", str(folders / "draft"), "--target", str(folders / "target"), "--data",
            str(tmp_path / "syn"), "--max-steps", "6", "--lr", "3e-2", "--batch-size", "4", "--val-fraction", "0.25",
            "--eval-every", "0", "--log-every", "1"]
    distill.main([*argv, "--out", str(tmp_path / "full"), "--json", str(tmp_path / "full.json")])
    distill.main([*argv, "--out", str(tmp_path / "split"), "--stop-at", "3", "--json", str(tmp_path / "a.json")])
    # --lr on the command line differs from the checkpoint's: the checkpoint's wins (a note says so)
    distill.main(["train", "--resume", str(tmp_path / "split"), "--lr", "1", "--json", str(tmp_path / "b.json")])
    full, a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "a", "b"))
    assert a["stopped"] == "stop_at" and b["step"] == 6 and len(a["losses"] + b["losses"]) == 6
    assert a["losses"] + b["losses"] == pytest.approx(full["losses"], abs=1e-6)
    wa, wb = (checkpoint.load_model(str(tmp_path / n)).state_dict() for n in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stored_top_k_data_trains_without_a_target_pass(folders, smollm2_tok, tmp_path, capsys):
    write_prompts(tmp_path / "p.jsonl")
    distill.main(["generate", "--target", str(folders / "target"), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                  str(tmp_path / "gen"), "--temperatures", "1", "--max-new-tokens", "5", "--max-prompt-tokens", "128",
                  "--store-top-k", "4"])
    rows = [r for rs in shard_rows(tmp_path / "gen").values() for r in rs]
    assert rows and all(len(r["top_k_ids"]) == len(r["top_k_logprobs"]) == len(r["completion_ids"]) for r in rows)
    assert all(len(k) == 4 and k[0] >= k[-1] for r in rows for k in r["top_k_logprobs"])
    argv = ["train", "--draft", str(folders / "draft"), "--data", str(tmp_path / "gen"), "--loss", "kl",
            "--max-steps", "6", "--lr", "3e-2", "--batch-size", "4", "--val-fraction", "0", "--eval-every", "0",
            "--log-every", "1"]
    distill.main([*argv, "--out", str(tmp_path / "ft"), "--json", str(tmp_path / "r.json")])
    assert "top-k stored in the data: no teacher pass" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["losses"][-1] < r["losses"][0] - 0.5
    with pytest.raises(common.UserError, match="--teacher stored needs"):
        distill.main(["train", "--draft", str(folders / "draft"), "--data", str(tmp_path / "gen"), "--loss", "ce",
                      "--teacher", "stored", "--out", str(tmp_path / "bad")])


def test_on_policy_training_lowers_its_loss_and_resumes_exactly(folders, tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"Say something about the number {i}.\n" for i in range(12)))
    target = tiny(seed=5, tie_embeddings=False)
    with torch.no_grad():
        target.lm_head.weight.mul_(30)   # a peaked teacher: something definite to learn
    checkpoint.save_model(target, str(tmp_path / "target"))
    argv = ["train", "--draft", str(folders / "draft"), "--target", str(tmp_path / "target"), "--on-policy",
            str(tmp_path / "p.txt"), "--loss", "kl", "--rollout-tokens", "6", "--rollout-temperatures", "1,0",
            "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4", "--eval-every", "0", "--log-every", "1"]
    distill.main([*argv, "--out", str(tmp_path / "full"), "--json", str(tmp_path / "full.json")])
    distill.main([*argv, "--out", str(tmp_path / "split"), "--stop-at", "3", "--json", str(tmp_path / "a.json")])
    distill.main(["train", "--resume", str(tmp_path / "split"), "--json", str(tmp_path / "b.json")])
    full, a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "a", "b"))
    assert a["losses"] + b["losses"] == pytest.approx(full["losses"], abs=1e-6)
    wa, wb = (checkpoint.load_model(str(tmp_path / n)).state_dict() for n in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the trained draft is closer to the target on text it writes itself (a fixed batch of its rollouts)
    prompts = [[1] + list(range(100 + 7 * i, 105 + 7 * i)) for i in range(8)]
    kl = distill.make_loss_fn(checkpoint.load_model(str(tmp_path / "target")), "kl")
    before, after = (checkpoint.load_model(str(p)) for p in (folders / "draft", tmp_path / "full"))
    batch = [next(generation.OnPolicyBatches(m, prompts, 8, max_new_tokens=6, temperatures=[1.0], stop_ids=(),
                                          seq_len=64)) for m in (before, after)]
    assert kl(after, *batch[1]).item() < 0.99 * kl(before, *batch[0]).item()
    with pytest.raises(common.UserError, match="--on-policy needs a token-level --loss"):
        distill.main([*argv, "--loss", "ce", "--out", str(tmp_path / "bad")])


@pytest.mark.parametrize("case, message", [
    ("loss", "unknown loss"), ("vocabulary", "vocabulary mismatch"), ("no_shards", "no shards"),
    ("corrupt_shard", r"shard-r0-p00001-t1\.jsonl:2: corrupt"), ("no_prompts", "has no prompts"),
    ("missing_prompts", "not found"), ("empty_prompts", "empty"), ("unknown_source", "unknown prompt source"),
    ("negative_warmup", "--warmup must be non-negative")])
def test_bad_input_is_one_clear_line(case, message, folders, smollm2_tok, tmp_path):
    write_synthetic(tmp_path / "syn", smollm2_tok, n=4)
    train = ["train", "--draft", str(folders / "draft"), "--target", str(folders / "target"), "--out",
             str(tmp_path / "o"), "--data", str(tmp_path / "syn")]
    prompts = ["generate", "--target", str(folders / "target"), "--out", str(tmp_path / "g"), "--prompts"]
    if case == "vocabulary":
        checkpoint.save_model(tiny(vocab=1000), str(tmp_path / "small"))
    if case == "corrupt_shard":
        bad = tmp_path / "syn" / "shard-r0-p00001-t1.jsonl"
        bad.write_text('{"prompt_ids": [1], "completion_ids": [2]}\n{"prompt_ids": [1], "completion_i\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "none.txt").write_text("\n\n")
    argv = {"loss": train + ["--loss", "mse"],
            "vocabulary": train[:2] + [str(tmp_path / "small")] + train[3:],
            "no_shards": train[:-1] + [str(tmp_path / "empty")],
            "corrupt_shard": train,
            "no_prompts": prompts + [str(tmp_path / "none.txt")],
            "missing_prompts": prompts + [str(tmp_path / "nope.jsonl")],
            "empty_prompts": prompts + [""],
            "unknown_source": prompts + ["alpaca"],
            "negative_warmup": train + ["--warmup", "-1"]}[case]
    with pytest.raises(common.UserError, match=message):
        distill.main(argv)


def test_cli_exit_code_2_on_bad_input(folders, tmp_path):
    # through the real command line: exit code 2 and one line on stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "distill.py"), "train", "--draft", str(folders / "draft"),
                        "--target", str(folders / "target"), "--data", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
