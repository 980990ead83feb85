"""distill.py: batched generation is exact, the data set is sharded and resumable, the losses are right,
training lowers the loss, bad input is one clear line. Tiny random models; offline; CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import distill
import checkpoint
import common
import model
from pretrain import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 49152   # the smollm2 tokenizer's vocabulary: tiny models that pass the vocabulary checks


def tiny(vocab=V, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=256,
               tokenizer="smollm2", bos_id=1, eos_id=2)
    cfg.update(kw)
    return model.Transformer(model.ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny target and a tiny draft (other weights) saved as model folders, plus a prompt file."""
    root = tmp_path_factory.mktemp("distill")
    checkpoint.save_model(tiny(seed=0), str(root / "target"))
    checkpoint.save_model(tiny(seed=1), str(root / "draft"))
    return root


# -----------------------------------------------------------------------------
# generation

def test_batched_generation_equals_one_row_at_a_time(monkeypatch):
    # untied head, seed 1: a random model whose greedy tokens depend on the context (a tied one repeats a token)
    m = tiny(vocab=97, seed=1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 5)]
    alone = [distill.generate_batch(m, [p], 10, temperature=0)[0][0] for p in prompts]
    batched, stopped = distill.generate_batch(m, prompts, 10, temperature=0)
    assert batched == alone and not any(stopped) and all(len(set(a)) > 3 for a in alone)
    # per-row stop: a token that row 1 emits third ends row 1 there and changes no other row's tokens
    # (finished rows leave the batch: the cache keeps only the live rows, and the others must not notice)
    stop = alone[1][2]
    cut = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    kept, keep_rows = [], m.keep_cache_rows
    monkeypatch.setattr(m, "keep_cache_rows", lambda rows, length: (kept.append(list(rows)), keep_rows(rows, length)))
    batched, stopped = distill.generate_batch(m, prompts, 10, temperature=0, stop_ids={stop})
    monkeypatch.undo()
    assert batched == cut and stopped[1] and len(batched[1]) <= 3
    assert kept and all(len(rows) < len(prompts) for rows in kept)
    assert [distill.generate_batch(m, [p], 10, temperature=0, stop_ids={stop})[0][0] for p in prompts] == cut


def test_user_turn_prefix_is_the_chat_templates(tok):
    prefix = distill.user_turn_prefix(tok)
    assert tok.decode(prefix).endswith("<|im_start|>user\n")
    assert tok.chat([{"role": "user", "content": "hello"}])[:len(prefix)] == prefix


def test_code_prompts_are_def_lines_with_docstrings():
    prompts = distill.code_prompts("code:builtin:code:5", 0)
    assert len(prompts) == 5
    for p in prompts:
        assert p.lstrip().startswith(("def ", "async def ")) and ('"""' in p or "'''" in p) and p.endswith("\n")


def write_prompts(path):
    humaneval_prompt = next(iter(p for p in distill.evaluation_prompts() if p.startswith("from typing")))
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


def test_generation_is_sharded_and_resumable(folders, tok, tmp_path):
    target = checkpoint.load_model(str(folders / "target"))
    n_prompts = write_prompts(tmp_path / "p.jsonl")
    kw = dict(prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "gen"), target_spec="t", temperatures=(0, 1),
              batch_size=3, max_new_tokens=3, max_prompt_tokens=128, log=lambda *a: None)
    m0 = distill.generate_dataset(target, tok, rank=0, world_size=2, **kw)
    assert m0["counts"]["dropped_eval"] == 2   # the benchmark's instruction and HumanEval's prompt never get in
    distill.generate_dataset(target, tok, rank=1, world_size=2, **kw)
    rows = shard_rows(tmp_path / "gen")
    by_rank = [{r["unit"] for name, rs in rows.items() if name.startswith(f"shard-r{k}-") for r in rs} for k in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]       # disjoint shares, both non-empty
    got = sorted((r["prompt"], r["temperature"]) for rs in rows.values() for r in rs)
    assert len(got) == len(set(got)) == 2 * n_prompts                      # every prompt at every temperature
    r = rows[sorted(rows)[0]][0]
    assert r["prompt_ids"] == tok.chat([{"role": "user", "content": r["prompt"]}])
    assert tok.decode([i for i in r["completion_ids"] if i not in tok.stop_ids]) == r["completion"]

    mtimes = {n: os.path.getmtime(tmp_path / "gen" / n) for n in rows}
    for rank in (0, 1):
        m = distill.generate_dataset(target, tok, rank=rank, world_size=2, **kw)
    assert shard_rows(tmp_path / "gen") == rows                            # a rerun adds nothing
    assert {n: os.path.getmtime(tmp_path / "gen" / n) for n in rows} == mtimes
    assert m["counts"]["examples"] == 2 * n_prompts and m["counts"]["units_done"] == m["counts"]["units_total"]
    with pytest.raises(common.UserError, match="other settings"):
        distill.generate_dataset(target, tok, **{**kw, "max_new_tokens": 4})


# -----------------------------------------------------------------------------
# the losses

def test_loss_mask_is_completion_only():
    x, y = distill.completion_row([10, 11, 12], [20, 21], seq_len=64)
    assert x == [10, 11, 12, 20] and y == [IGNORE, IGNORE, 20, 21]
    rows = [distill.completion_row([5, 6, 7, 8], [9, 3], 64), distill.completion_row([4], [7, 8, 9], 64)]
    xb, yb = distill.pad_rows(rows)
    assert (yb != IGNORE).sum().item() == 5                                # 2 + 3 completion tokens, nothing else
    m = tiny(vocab=97)
    logits = m(xb)
    keep = yb != IGNORE
    want = F.cross_entropy(logits[keep], yb[keep])
    assert torch.allclose(distill.make_loss_fn(None, "ce")(m, xb, yb), want, atol=1e-5)


def test_batches_resume_exactly_and_split_across_ranks():
    rows = [distill.completion_row([1, 2], [3 + i, 4], 16) for i in range(10)]
    a = distill.CompletionBatches(rows, 3, seed=1)
    seen = [next(a) for _ in range(5)]                                     # crosses an epoch boundary
    b = distill.CompletionBatches(rows, 3, seed=1)
    for _ in range(2):
        next(b)
    c = distill.CompletionBatches(rows, 3, seed=1)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in seen[2:]:
        got = next(c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    r0, r1 = (distill.CompletionBatches(rows, 3, seed=1, rank=r, world_size=2) for r in (0, 1))
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
    assert abs(parts["kd"]) < 1e-5
    ce = F.cross_entropy(same, y).item()
    assert total.item() == pytest.approx(ce if loss.startswith("ce+") else 0.0, abs=1e-5)
    other = target_logits + torch.randn(6, 50, generator=g)
    total, parts = distill.distill_loss(other, y, target_logits, loss, kd_temperature, top_k)
    assert parts["kd"] > 1e-3
    assert total.item() == pytest.approx(parts["kd"] + (parts["ce"] if loss.startswith("ce+") else 0), rel=1e-5)


def test_token_level_loss_against_itself_is_zero_through_the_model():
    m = tiny(vocab=97)
    xb, yb = distill.pad_rows([distill.completion_row([5, 6, 7], [9, 3, 4], 64)])
    assert distill.make_loss_fn(m, "kl")(m, xb, yb).item() == pytest.approx(0, abs=1e-6)
    assert distill.make_loss_fn(m, "tvd")(m, xb, yb).item() == pytest.approx(0, abs=1e-6)
    assert distill.make_loss_fn(tiny(vocab=97, seed=3), "kl")(m, xb, yb).item() > 0


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


def test_several_data_folders_are_one_set_without_repeats(tok, tmp_path):
    write_synthetic(tmp_path / "a", tok, n=24)   # questions 0..23
    write_synthetic(tmp_path / "b", tok, n=30)   # questions 0..29: 24 repeats of a, 6 new
    assert len(distill.read_synthetic(str(tmp_path / "a"))) == 24
    both = distill.read_synthetic(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert len(both) == len(set(map(str, both))) == 30
    with pytest.raises(common.UserError, match="not found: .*missing"):
        distill.read_synthetic(f"{tmp_path / 'a'},{tmp_path / 'missing'}")


def test_train_reduces_the_loss(folders, tok, tmp_path):
    write_synthetic(tmp_path / "syn", tok)
    out = tmp_path / "ft"
    distill.main(["train", "--draft", str(folders / "draft"), "--target", str(folders / "target"),
                  "--data", str(tmp_path / "syn"), "--out", str(out), "--max-steps", "8", "--lr", "3e-2",
                  "--batch-size", "4", "--val-fraction", "0.25", "--eval-every", "0", "--log-every", "100",
                  "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["val_rows"] > 0 and r["step"] == 8
    assert r["val_loss_end"] < r["val_loss_start"] - 0.5
    assert checkpoint.load_model(str(out)).config.vocab_size == V


def test_bad_inputs_are_one_clear_line(folders, tok, tmp_path):
    write_synthetic(tmp_path / "syn", tok, n=4)
    base = ["train", "--draft", str(folders / "draft"), "--target", str(folders / "target"), "--out",
            str(tmp_path / "o"), "--data"]
    with pytest.raises(common.UserError, match="unknown loss"):
        distill.main(base + [str(tmp_path / "syn"), "--loss", "mse"])
    checkpoint.save_model(tiny(vocab=1000), str(tmp_path / "small"))
    with pytest.raises(common.UserError, match="vocabulary mismatch"):
        distill.main(["train", "--draft", str(tmp_path / "small"), "--target", str(folders / "target"),
                      "--data", str(tmp_path / "syn"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no shards"):
        distill.main(base + [str(tmp_path / "empty")])
    bad = tmp_path / "syn" / "shard-r0-p00001-t1.jsonl"
    bad.write_text('{"prompt_ids": [1], "completion_ids": [2]}\n{"prompt_ids": [1], "completion_i\n')
    with pytest.raises(common.UserError, match=r"shard-r0-p00001-t1\.jsonl:2: corrupt"):
        distill.main(base + [str(tmp_path / "syn")])

    (tmp_path / "none.txt").write_text("\n\n")
    gen = ["generate", "--target", str(folders / "target"), "--out", str(tmp_path / "g"), "--prompts"]
    for prompts, msg in [(str(tmp_path / "none.txt"), "has no prompts"), (str(tmp_path / "nope.jsonl"), "not found"),
                         ("", "empty"), ("alpaca", "unknown prompt source")]:
        with pytest.raises(common.UserError, match=msg):
            distill.main(gen + [prompts])
    # through the real command line: exit code 2 and one line on stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "distill.py")] + base + [str(tmp_path / "empty")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
