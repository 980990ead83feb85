"""pretrain.py over train.py: the loop learns, resumes exactly, survives signals, trains in step under torchrun,
and writes drafts that transformers loads. Tiny preset, a few steps, a small local corpus; offline on CPU."""
import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import common
import pretrain as P
import train as T
from conftest import ROOT, tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SEQ, BATCH = 32, 4
TOKENS_PER_STEP = SEQ * BATCH
SMALL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small repeated corpus: a folder of text files (data.py holds at least one of them out for validation)."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = ["The quick brown fox jumps over the lazy dog.", "A draft model proposes tokens; the target checks them.",
             "def add(a, b):\n    return a + b\n", "Speculative decoding keeps the target's distribution."]
    for i in range(6):
        (folder / f"doc{i}.txt").write_text("\n".join(lines[(i + j) % 4] for j in range(60)) + "\n")
    return str(folder)


def flags(corpus, out, steps, *extra):
    return ["--preset", "tiny", "--data", corpus, "--seq-len", str(SEQ), "--batch-size", str(BATCH),
            "--max-tokens", str(steps * TOKENS_PER_STEP), "--out", str(out), "--device", "cpu", "--lr", "1e-2",
            "--warmup", "2", "--val-batches", "1", "--eval-every", "0", "--log-every", "1", *extra]


def run_main(argv, json_path):
    """pretrain.main in this process (no interpreter start-up); returns its --json report."""
    P.main([*argv, "--json", str(json_path)])
    return json.loads(open(json_path).read())


def spawn(argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain.py"), *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def saved_step(folder):
    return json.loads(torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)["meta"])["step"]


def test_loss_is_the_mean_next_token_cross_entropy_by_hand():
    draft = tiny_model(vocab_size=300, **SMALL)
    x, y = torch.randint(0, 300, (3, 10)), torch.randint(0, 300, (3, 10))
    y[0, :4] = T.IGNORE  # ignored targets are not scored
    logits = draft(x).double()                                                      # (B, T, V)
    # by hand: -log softmax at the target, averaged over the 26 scored positions
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    scored = [(b, t) for b in range(3) for t in range(10) if y[b, t] != T.IGNORE]
    want = -sum(logp[b, t, y[b, t]] for b, t in scored) / len(scored)
    loss = T.next_token_loss(draft, x, y)
    assert len(scored) == 26 and loss.item() == pytest.approx(want.item(), abs=1e-5)
    full = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=T.IGNORE)
    assert loss.item() == pytest.approx(full.item(), abs=1e-5)
    # under bf16 autocast the matmuls run in bf16, the softmax in float32: close to the float32 loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = T.next_token_loss(draft, x, y)
    assert low.dtype == torch.float32 and low.item() != loss.item()
    assert low.item() == pytest.approx(loss.item(), abs=0.02)


@contextlib.contextmanager
def host_syncs():
    """Record every call that would make the host wait for an accelerator (a value read back, a shape that depends
    on data) into the yielded list. On the CPU nothing waits, but the same Python calls happen on a GPU."""
    calls, real, patch = [], {}, pytest.MonkeyPatch()
    for owner, names in ((torch.Tensor, ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__",
                                         "__int__", "__index__", "__getitem__"]), (torch, ["tensor", "nonzero"])):
        for name in names:
            real[owner, name] = fn = getattr(owner, name)

            def counted(*args, _name=name, _fn=fn, **kw):
                boolean_index = _name == "__getitem__" and isinstance(args[1], torch.Tensor) and \
                    args[1].dtype == torch.bool                     # x[mask]: a data-dependent shape
                if _name != "__getitem__" or boolean_index:
                    calls.append(_name)
                return _fn(*args, **kw)
            patch.setattr(owner, name, counted)
    try:
        yield calls
    finally:
        patch.undo()


@pytest.mark.parametrize("trimmed", [False, True])
def test_a_step_that_does_not_log_never_waits_for_the_device(trimmed):
    draft = tiny_model(vocab_size=300, **SMALL).train()
    if trimmed:
        draft.trim_head(list(range(0, 300, 2)))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g)) for _ in range(8)]
    marks = []   # the number of host syncs so far, each time the loop takes a micro-batch

    def batches():
        for batch in data:
            marks.append(len(calls))
            yield batch
    opt = T.configure_optimizer(draft, 1e-3, 0.1)
    cfg = T.LoopConfig(max_steps=4, lr=1e-3, grad_accum=2, log_every=100)   # logs after steps 1 and 4 only
    with host_syncs() as calls:
        report = T.train(draft, opt, batches(), cfg, device=torch.device("cpu"), loss_fn=T.next_token_loss,
                         log=lambda *a: None)
    assert len(report["losses"]) == 4 and len(marks) == 8
    # micro-batches 2..5 are steps 2 and 3, which log nothing: from the first of them to step 4's first, no sync
    assert calls[marks[2]:marks[6]] == []
    assert "tolist" in calls[marks[6]:]   # the logging step reads the losses: the counter sees it


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                           ("NVIDIA H100 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312),
                                           ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("GAUDI2", 432),
                                           ("GAUDI3", 1835), ("", None), ("Apple M2", None)])
def test_mfu_knows_each_devices_peak(name, tflops):
    peak = T.peak_flops(name)
    assert (peak is None) if tflops is None else peak == tflops * 1e12


def test_resume_rule_checkpoint_then_given_then_default(capsys):
    defaults = {"lr": 1.0, "seq_len": 8, "max_tokens": 100, "new_flag": "x"}
    args = argparse.Namespace(lr=2.0, max_tokens=300)            # given on the command line (SUPPRESS: no others)
    given = common.run_args(args, defaults, {"lr": 3.0, "seq_len": 16, "max_tokens": 200}, may_change=["max_tokens"])
    assert given == {"lr", "max_tokens"}
    # lr: the checkpoint's, with a note; seq_len: the checkpoint's; max_tokens may change; new_flag: the default
    assert vars(args) == {"lr": 3.0, "seq_len": 16, "max_tokens": 300, "new_flag": "x"}
    assert "--lr is taken from the checkpoint" in capsys.readouterr().out
    fresh = argparse.Namespace(lr=2.0)
    common.run_args(fresh, defaults)
    assert vars(fresh) == {"lr": 2.0, "seq_len": 8, "max_tokens": 100, "new_flag": "x"}


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [T.lr_at(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert T.lr_at(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)


def test_optimizer_skips_decay_on_norms():
    draft = tiny_model()
    opt = T.configure_optimizer(draft, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(draft.parameters()))
    # Gaudi without Habana's FusedAdamW (an ImportError, as on some releases in eager mode): torch's AdamW
    assert type(T.configure_optimizer(draft, 1e-3, 0.1, device="hpu")) is torch.optim.AdamW


@pytest.mark.parametrize("trimmed", [False, True])
def test_validation_in_the_loop_scores_the_weights_as_they_are_now(trimmed):
    """The loop validates with the draft in eval mode, where a tied trimmed head keeps its rows of the embedding
    between calls. The fused AdamW step does not bump a parameter's _version, so only train() dropping them keeps
    the next validation from scoring the old head (a 6 Dec pretraining run logged val 9.0 for weights worth 3.5)."""
    def make():
        m = tiny_model(tie_embeddings=True, weight_std=0.3)
        return m.trim_head(list(range(0, 128, 2))) if trimmed else m
    torch.manual_seed(0)
    m = make()
    optimizer = T.configure_optimizer(m, 0.1, 0.0, device=torch.device("cpu"))
    batches = [(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)))]
    before = T.evaluate(m, batches, torch.device("cpu"))
    T.next_token_loss(m, *batches[0]).backward()
    optimizer.step()
    after = T.evaluate(m, batches, torch.device("cpu"))
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    assert after != before and after == pytest.approx(T.evaluate(fresh, batches, torch.device("cpu")), abs=1e-6)


def test_loss_decreases_on_a_small_repeated_corpus(corpus, tmp_path):
    r = run_main(flags(corpus, tmp_path / "out", 12), tmp_path / "r.json")
    assert len(r["losses"]) == 12 and r["step"] == 12
    assert r["losses"][-1] < r["losses"][0] - 1.0
    assert r["val_loss_end"] < r["val_loss_start"] - 1.0
    assert saved_step(tmp_path / "out") == 12


def test_bfloat16_on_cpu_trains_under_autocast_with_fp32_weights(corpus, tmp_path):
    fp32 = run_main(flags(corpus, tmp_path / "a", 4), tmp_path / "a.json")
    bf16 = run_main(flags(corpus, tmp_path / "b", 4, "--dtype", "bfloat16"), tmp_path / "b.json")
    assert bf16["losses"] != fp32["losses"]                          # the matmuls really ran in bf16 ...
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=0.05)  # ... and trained the same way
    assert all(w.dtype == torch.float32 for w in weights(tmp_path / "b").values())


def test_resume_is_exact(corpus, tmp_path):
    # the unbroken run reads its losses on the host only every 4th step: still one exact loss per step
    full = run_main(flags(corpus, tmp_path / "full", 6, "--log-every", "4"), tmp_path / "full.json")
    first = run_main(flags(corpus, tmp_path / "split", 6, "--stop-at", "3"), tmp_path / "first.json")
    assert first["stopped"] == "stop_at" and saved_step(tmp_path / "split") == 3
    rest = run_main(["--resume", str(tmp_path / "split"), "--log-every", "1"], tmp_path / "rest.json")
    assert rest["first_step"] == 4 and rest["step"] == 6
    losses = first["losses"] + rest["losses"]
    assert len(losses) == 6
    for a, b in zip(losses, full["losses"]):
        assert a == pytest.approx(b, abs=1e-6)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_the_last_completed_step(corpus, tmp_path):
    out = tmp_path / "out"
    proc = spawn(flags(corpus, out, 10_000, "--save-every", "0"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=60)[0]
    text = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text
    last = max(int(m) for m in re.findall(r"^step (\d+)/", text, flags=re.M))
    assert saved_step(out) == last >= 3
    assert "--resume" in text
    checkpoint.load_model(str(out))   # a complete, loadable draft


def test_sigkill_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain.py"),
                             *flags(corpus, out, 10_000, "--save-every", "2", "--val-batches", "0")],
                            cwd=ROOT, env={**ENV, T.SAVE_DELAY_ENV: "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = f"{out}.tmp-{proc.pid}"
    try:
        deadline = time.time() + 60
        while not (out / "train_state.pt").exists():     # the first save (step 2) is complete ...
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        while not os.path.isdir(tmp):                    # ... and the second one is half-written
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    assert saved_step(out) == 2
    assert T.load_checkpoint(str(out))["step"] == 2
    checkpoint.load_model(str(out))


def test_torchrun_ranks_stay_in_step_and_match_one_process(corpus, tmp_path):
    steps = 4
    common = ["--preset", "tiny", "--data", corpus, "--seq-len", str(SEQ), "--max-tokens",
              str(steps * 2 * TOKENS_PER_STEP), "--device", "cpu", "--lr", "1e-2", "--warmup", "1",
              "--val-batches", "0", "--log-every", "1", "--data-sharding", "rows"]
    def torchrun():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "pretrain.py", *common, "--batch-size", str(BATCH), "--out", str(tmp_path / "ddp"),
                               "--json", str(tmp_path / "ddp.json")],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    ddp = torchrun()
    if ddp.returncode and "SIGABRT" in ddp.stderr and "draft saved" in ddp.stdout:
        # a gloo rank once aborted while leaving, after the run had finished (CI, 6 Dec; 0 in 91 runs here since):
        # one more try, and a run that fails twice (or fails before it finished) still fails the test
        ddp = torchrun()
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "2 processes" in ddp.stdout
    one = run_main([*common, "--batch-size", str(2 * BATCH), "--out", str(tmp_path / "one")], tmp_path / "one.json")
    two = json.loads(open(tmp_path / "ddp.json").read())
    assert two["world_size"] == 2 and two["replicas_identical"] is True
    assert two["global_batch_tokens"] == one["global_batch_tokens"] and len(two["losses"]) == steps
    for a, b in zip(two["losses"], one["losses"]):
        assert a == pytest.approx(b, abs=1e-4)
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_init_from_loads_weights_with_fresh_optimizer_and_schedule(corpus, tmp_path):
    first = run_main(flags(corpus, tmp_path / "pt", 4), tmp_path / "pt.json")
    second = run_main(["--init-from", str(tmp_path / "pt"), *flags(corpus, tmp_path / "cp", 2, "--stop-at", "1")[2:]],
                      tmp_path / "cp.json")
    # the same held-out batch scores the same before the second run trains: the weights were loaded
    assert second["val_loss_start"] == pytest.approx(first["val_loss_end"], abs=1e-5)
    assert second["first_step"] == 1 and second["step"] == 1
    # a continued-pretraining run resumes like any other
    third = run_main(["--resume", str(tmp_path / "cp")], tmp_path / "cp2.json")
    assert third["first_step"] == 2 and third["step"] == 2
    state = torch.load(tmp_path / "cp" / "train_state.pt", weights_only=True)
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())   # a fresh AdamW
    # the draft loads in transformers with the same logits as ours
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "cp")).eval()
    ours = checkpoint.load_model(str(tmp_path / "cp"))
    x = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits.float(), ours(x), atol=1e-4)


def test_init_from_with_another_vocabulary_is_refused(tmp_path):
    other = tiny_model(vocab_size=1000, tokenizer="smollm2", **SMALL)
    checkpoint.save_model(other, str(tmp_path / "other"))
    with pytest.raises(common.UserError, match="1000"):
        P.main(["--init-from", str(tmp_path / "other"), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--seq-len", "-4"], "--seq-len must be positive"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--dtype", "float16", "--device", "cpu"], "loss scaling"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nope"], "cuda|device"),
])
def test_bad_input_is_one_line_user_error(argv, message, tmp_path):
    with pytest.raises(common.UserError, match=message):
        P.main([*argv, "--out", str(tmp_path / "x")])


def test_compile_in_gaudi_lazy_mode_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "pick_device", lambda name: torch.device("hpu"))
    monkeypatch.setattr(T, "hpu_lazy", lambda: True)
    with pytest.raises(common.UserError, match="eager mode"):
        P.main(["--compile", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("device, lazy, flag, want", [
    ("cuda", False, None, True), ("cpu", False, None, False), ("mps", False, None, False), ("hpu", False, None, True),
    ("hpu", True, None, False), ("cuda", False, False, False), ("cpu", False, True, True)])
def test_compile_is_on_by_default_where_it_pays(monkeypatch, device, lazy, flag, want):
    monkeypatch.setattr(T, "hpu_lazy", lambda: lazy)
    assert T.compile_default(flag, torch.device(device)) is want


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="corrupt"):
        P.main(["--resume", str(folder)])


def test_out_of_memory_at_the_first_step_names_the_knobs(corpus, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(T, "train_step", oom)
    with pytest.raises(common.UserError, match="--batch-size"):
        P.main(flags(corpus, tmp_path / "out", 2))


def test_cli_exit_code_2_on_bad_input():
    r = subprocess.run([sys.executable, "pretrain.py", "--preset", "nope"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------------------------------------
# A trimmed head (--head-vocab) and a start from the target (--init-from-target)

@pytest.mark.parametrize("tied", [True, False])
def test_loss_over_a_trimmed_head_is_the_cross_entropy_over_its_subset(tied):
    full = tiny_model(vocab_size=300, tie_embeddings=tied, **SMALL)
    trimmed = tiny_model(vocab_size=300, tie_embeddings=tied, **SMALL).trim_head(list(range(100, 0, -1)))
    x, y = torch.randint(0, 300, (3, 10)), torch.randint(0, 200, (3, 10))
    y[0, :3] = T.IGNORE
    # by hand: the full model's logits at the subset's ids, renormalised; targets outside it are not scored
    logp = torch.log_softmax(full(x)[..., trimmed.head_ids], dim=-1)                    # (B, T, K)
    inside = (y >= 1) & (y <= 100)
    want = -logp[inside].gather(1, (100 - y[inside])[:, None]).mean()                   # position of id i: 100 - i
    loss = T.next_token_loss(trimmed, x, y)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    # and it is F.cross_entropy over the trimmed head's full logits, targets mapped to their positions in it
    pos = torch.where(inside, 100 - y, T.IGNORE)
    assert loss.item() == pytest.approx(F.cross_entropy(trimmed(x).flatten(0, 1), pos.flatten()).item(), abs=1e-6)
    # gradients reach the subset's rows of the embedding (tied) or the head (untied)
    loss.backward()
    assert all(p.grad is not None for p in trimmed.parameters())


def write_completions(folder, completions):
    """A `distill.py generate` folder holding these completions (the target's text) after a short prompt."""
    os.makedirs(folder, exist_ok=True)
    rows = [{"prompt_ids": [1, 2], "completion_ids": c} for c in completions]
    (folder / "shard-r0-p00000-t0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_head_vocab_keeps_special_tokens_then_the_targets_most_frequent(corpus, tmp_path):
    write_completions(tmp_path / "gen", [[1000 + i] * (10 - i) + [2] for i in range(10)])
    r = run_main(flags(corpus, tmp_path / "out", 2, "--head-vocab", "22", "--head-vocab-from", str(tmp_path / "gen")),
                 tmp_path / "r.json")
    assert r["head_vocab"] == 22
    special = list(range(17))    # SmolLM2's special and stop tokens: ids 0..16
    assert checkpoint.load_model(str(tmp_path / "out")).head_ids.tolist() == special + [1000, 1001, 1002, 1003, 1004]


def test_a_trimmed_draft_trains_and_resumes_exactly(corpus, tmp_path):
    trim = ("--head-vocab", "300")   # counted over the first training rows of the corpus
    full = run_main(flags(corpus, tmp_path / "full", 8, *trim), tmp_path / "full.json")
    assert full["head_vocab"] == 300 and full["losses"][-1] < full["losses"][0] - 1.0
    first = run_main(flags(corpus, tmp_path / "split", 8, *trim, "--stop-at", "4"), tmp_path / "first.json")
    rest = run_main(["--resume", str(tmp_path / "split"), "--log-every", "1"], tmp_path / "rest.json")
    assert first["losses"] + rest["losses"] == pytest.approx(full["losses"], abs=1e-6)
    a, b = (checkpoint.load_model(str(tmp_path / n)) for n in ("full", "split"))
    assert a.head_ids.tolist() == b.head_ids.tolist() and len(a.head_ids) == 300
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # the trimmed draft continues (--init-from) with its own subset
    cont = run_main(["--init-from", str(tmp_path / "full"), *flags(corpus, tmp_path / "cp", 1, "--head-vocab",
                                                                   "500")[2:]], tmp_path / "cp.json")
    assert cont["head_vocab"] == 300


def test_init_from_target_projects_the_table_onto_its_leading_singular_directions():
    target = tiny_model(vocab_size=300, dim=64)
    draft = tiny_model(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, tie_embeddings=False)
    P.init_from_target(draft, target)
    E, D = target.embed_tokens.weight.detach(), draft.embed_tokens.weight.detach()
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    best = U[:, :32] * S[:32]                                   # (V, 32): the best rank-32 approximation's coordinates
    assert torch.allclose(torch.linalg.svdvals(D), S[:32], rtol=1e-4)
    assert torch.allclose(D @ D.T, best @ best.T, atol=1e-4)    # the same up to a rotation: signs are arbitrary
    assert torch.equal(draft.lm_head.weight, D)                 # a tied target: its head rows are its table


def test_init_from_target_layers_copies_them_exactly(corpus, smollm2_tok, tmp_path):
    target = tiny_model(vocab_size=49152, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, tokenizer="smollm2")
    checkpoint.save_model(target, str(tmp_path / "target"))
    target = checkpoint.load_model(str(tmp_path / "target"))
    args = flags(corpus, tmp_path / "out", 1, "--init-from-target", str(tmp_path / "target"), "--target-layers", "2,0")
    draft = P.build_draft(P.parse_args(args[2:])[0], smollm2_tok, set(), "cpu")
    assert draft.config.n_layers == 2 and draft.config.dim == 32
    want = {"embed_tokens.weight": target.embed_tokens.weight, "norm.weight": target.norm.weight,
            **{f"layers.{i}.{k}": v for i, j in enumerate([2, 0]) for k, v in target.layers[j].state_dict().items()}}
    assert set(want) == set(draft.state_dict()) and all(torch.equal(draft.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(common.UserError, match="--dim must be 32"):
        P.main([*args, "--dim", "64"])
    with pytest.raises(common.UserError, match="layers 0..2"):
        P.main([*args[:-1], "0,3"])


@pytest.mark.parametrize("extra, message", [
    (["--head-vocab", "5"], "needs 17 <= k"), (["--head-vocab", "0"], "--head-vocab must be positive"),
    (["--target-layers", "0"], "--init-from-target")])
def test_bad_head_vocab_or_target_layers_is_one_line_exit_2(corpus, tmp_path, extra, message):
    r = subprocess.run([sys.executable, "pretrain.py", *flags(corpus, tmp_path / "x", 1, *extra)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
