"""Data pipeline: packing, mixing, sharding, held-out split, exact resume and clear errors, on small local files."""
import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import data
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(folder, n_files=120, seed=0):
    """n_files small text files, each a distinct document."""
    rng = random.Random(seed)
    words = "the draft model proposes tokens and the target verifies them in one pass 0 1 2 3 \u00e9t\u00e9".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: {body}\n")
    return str(folder)


def write_jsonl(path, prefix, n):
    path.write_text("".join(json.dumps({"text": f"{prefix} {k} " + "x" * (k % 7)}) + "\n" for k in range(n)))
    return str(path)


def rows_to_stream(batches):
    """Concatenate rows minus the one-token overlap between consecutive rows."""
    rows = [r for x, y in batches for r in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)]
    return np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])


def test_packing_loses_no_token(tmp_path, smollm2_tok):
    spec = write_corpus(tmp_path / "c")
    expected = []
    for doc in data.read_documents(spec):  # epoch 0, in the order the iterator reads it
        expected += smollm2_tok.encode(doc) + [smollm2_tok.doc_sep_id]
    T = 16
    it = data.iterate_batches(spec, smollm2_tok, T, 1, shuffle=False, shuffle_rows=8)
    n_rows = (len(expected) - 1) // T
    stream = rows_to_stream([next(it) for _ in range(n_rows)])
    assert len(stream) == n_rows * T + 1
    assert stream.tolist() == expected[:len(stream)]
    x, y = next(it)
    assert x.dtype == y.dtype and str(x.dtype) == "torch.int64" and x.shape == (1, T)


def test_rows_are_shifted_targets_and_shuffled(tmp_path, smollm2_tok):
    spec = write_corpus(tmp_path / "c")
    plain, _ = next(data.iterate_batches(spec, smollm2_tok, 8, 4, shuffle=False, shuffle_rows=64))
    x, y = next(data.iterate_batches(spec, smollm2_tok, 8, 4, shuffle_rows=64))
    assert (x[:, 1:] == y[:, :-1]).all()
    assert not (x == plain).all()


def test_large_vocab_uses_uint32(tmp_path, smollm2_tok):
    big = copy.copy(smollm2_tok)
    big.vocab_size = 128256
    it = data.iterate_batches(write_corpus(tmp_path / "c", 10), big, 8, 2)
    assert it.dtype == np.uint32 and data.iterate_batches(str(tmp_path / "c"), smollm2_tok, 8, 2).dtype == np.uint16
    next(it)


def test_mixture_proportions_match_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", "alpha", 4000)
    b = write_jsonl(tmp_path / "b.jsonl", "beta", 4000)
    docs = []
    for d in data.read_documents(f"{a}=0.7,{b}=0.3", seed=1):
        docs.append(d)
        if len(docs) == 3000:
            break
    share = sum(d.startswith("alpha") for d in docs) / len(docs)
    assert abs(share - 0.7) < 0.035  # 4 standard deviations of a binomial share over 3000 draws
    assert data.parse_mixture("builtin") == [("builtin:prose", 0.7), ("builtin:code", 0.3)]
    assert data.parse_mixture(f"{a}=2,{b}=6") == [(a, 0.25), (b, 0.75)]


def test_two_ranks_are_disjoint_and_cover_the_stream(tmp_path, smollm2_tok):
    spec = write_corpus(tmp_path / "c")
    whole = list(data.read_documents(spec))
    r0 = list(data.read_documents(spec, rank=0, world_size=2))
    r1 = list(data.read_documents(spec, rank=1, world_size=2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(whole) and r0 and r1
    x0, _ = next(data.iterate_batches(spec, smollm2_tok, 32, 2, rank=0, world_size=2, shuffle=False))
    x1, _ = next(data.iterate_batches(spec, smollm2_tok, 32, 2, rank=1, world_size=2, shuffle=False))
    assert smollm2_tok.decode(x0[0].tolist()) != smollm2_tok.decode(x1[0].tolist())


def test_hub_style_stream_shards_by_node(tmp_path):
    """hf:NAME goes through datasets' streaming + split_dataset_by_node; a local dataset folder works offline."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", "row", 300)
    spec = f"hf:{tmp_path / 'ds'}"
    whole = list(data.read_documents(spec)) + list(data.read_documents(spec, split="val"))
    r0 = list(data.read_documents(spec, rank=0, world_size=2))
    r1 = list(data.read_documents(spec, rank=1, world_size=2))
    assert len(whole) == 300 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(data.read_documents(spec))
    # resuming a rank's stream at a position gives the rest of that rank's stream (not of the whole stream)
    source = data.Source(spec)
    full = list(source.docs("train", 1, 2, seed=0, epoch=0))
    assert list(source.docs("train", 1, 2, seed=0, epoch=0, start=full[40][0])) == full[41:]


@pytest.mark.parametrize("mixture", [False, True])
def test_resume_is_exact(tmp_path, smollm2_tok, mixture):
    spec = write_corpus(tmp_path / "c")
    if mixture:
        spec = f"{spec}=0.6,{write_jsonl(tmp_path / 'j.jsonl', 'json doc', 500)}=0.4"
    make = lambda: data.iterate_batches(spec, smollm2_tok, 16, 3, seed=5, shuffle_rows=20)  # noqa: E731
    it = make()
    for _ in range(23):  # crosses several shuffle blocks and an epoch boundary of the jsonl
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    more = [next(it) for _ in range(31)]
    again = make()
    again.load_state_dict(state)
    for (x, y), (x2, y2) in zip(more, [next(again) for _ in range(31)]):
        assert (x == x2).all() and (y == y2).all()
    other = data.iterate_batches(spec, smollm2_tok, 32, 3, seed=5)
    with pytest.raises(UserError, match="seq_len"):
        other.load_state_dict(state)


def test_train_and_val_never_share_a_document(tmp_path, smollm2_tok):
    spec = write_corpus(tmp_path / "c", n_files=300)
    train, val = list(data.read_documents(spec)), list(data.read_documents(spec, split="val"))
    assert val and not set(train) & set(val) and len(train) + len(val) == 300
    assert data.heldout_documents(spec, 3, min_chars=10) == [d for d in val if len(d) >= 10][:3]
    batches = data.validation_batches(spec, smollm2_tok, 16, 2, 3)
    assert len(batches) == 3 and all(x.shape == (2, 16) for x, _ in batches)
    text = smollm2_tok.decode(batches[0][0][0].tolist())
    assert any(text[:20] in d for d in val)
    # three files only: one of them is still held out
    small = write_corpus(tmp_path / "small", n_files=3)
    assert len(list(data.read_documents(small, split="val"))) == 1


def test_bad_inputs_give_clear_errors(tmp_path, smollm2_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = write_corpus(tmp_path / "c", 5)
    (tmp_path / "empty.txt").write_text("")
    cases = [
        ("nosuchsource", "unknown data source"),
        ("builtin:poetry", "unknown builtin source"),
        (str(tmp_path / "missing" / "*.txt"), "no files match"),
        (str(tmp_path / "empty.txt"), "no train documents"),
        ("", "empty data spec"),
        (f"{good}=0.5,", "empty source"),
        (f"{good}=-1,builtin=1", "positive"),
        (f"{good}=abc,builtin=1", "not a number"),
        (f"{good}=0.5,builtin", "weight"),
        ("fineweb", "cannot reach the Hugging Face hub"),
        ("hf:someone/some-data", "cannot reach the Hugging Face hub"),
    ]
    for spec, message in cases:
        with pytest.raises(UserError, match=message):
            next(data.iterate_batches(spec, smollm2_tok, 16, 2))
    for seq_len in (0, -3):
        with pytest.raises(UserError, match="seq_len"):
            data.iterate_batches(good, smollm2_tok, seq_len, 2)


def test_command_line_stats_and_errors(tmp_path):
    spec = write_corpus(tmp_path / "c", 20)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "data.py", "--data", spec, "--stats", "--seq-len", "32",
                         "--max-tokens", "2000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "documents" in ok.stdout and "tokens/s" in ok.stdout and "sample row" in ok.stdout
    bad = subprocess.run([sys.executable, "data.py", "--data", "nosuch", "--tokenizer", "smollm2"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
