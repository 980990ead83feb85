"""pretrain.py: the loop learns, resumes exactly, survives signals, trains in step under torchrun, and writes
drafts that transformers loads. Tiny preset, a few steps, a small local corpus; everything offline on CPU."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import model as M
import pretrain as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
SEQ, BATCH = 32, 4
TOKENS_PER_STEP = SEQ * BATCH


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, threads of a tiny model mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_fused_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    draft = M.Transformer(M.ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    x, y = torch.randint(0, 300, (3, 10)), torch.randint(0, 300, (3, 10))
    y[0, :4] = P.IGNORE  # ignored targets are not scored
    grads = []
    for loss_fn in (P.next_token_loss, P.plain_next_token_loss):
        draft.zero_grad()
        loss = loss_fn(draft, x, y)
        (2.0 * loss).backward()   # the incoming gradient is applied
        grads.append((loss.item(), [p.grad.clone() for p in draft.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
    h = draft.hidden(x).flatten(0, 1)
    small_chunks = P.linear_cross_entropy(h, P.output_weight(draft), y.flatten(), chunk_rows=7)
    assert small_chunks.item() == pytest.approx(grads[1][0], abs=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [P.lr_at(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert P.lr_at(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)


def test_optimizer_skips_decay_on_norms():
    draft = M.Transformer(M.PRESETS["tiny"])
    opt = P.configure_optimizer(draft, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(draft.parameters()))


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
    full = run_main(flags(corpus, tmp_path / "full", 6), tmp_path / "full.json")
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
                            cwd=ROOT, env={**ENV, P.SAVE_DELAY_ENV: "2"},
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
    assert P.load_checkpoint(str(out))["step"] == 2
    checkpoint.load_model(str(out))


def test_torchrun_ranks_stay_in_step_and_match_one_process(corpus, tmp_path):
    steps = 4
    common = ["--preset", "tiny", "--data", corpus, "--seq-len", str(SEQ), "--max-tokens",
              str(steps * 2 * TOKENS_PER_STEP), "--device", "cpu", "--lr", "1e-2", "--warmup", "1",
              "--val-batches", "0", "--log-every", "1"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "pretrain.py", *common, "--batch-size", str(BATCH), "--out", str(tmp_path / "ddp"),
                          "--json", str(tmp_path / "ddp.json")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
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
    other = M.Transformer(M.ModelConfig(vocab_size=1000, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                        tokenizer="smollm2"))
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


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="corrupt"):
        P.main(["--resume", str(folder)])


def test_out_of_memory_at_the_first_step_names_the_knobs(corpus, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(P, "train_step", oom)
    with pytest.raises(common.UserError, match="--batch-size"):
        P.main(flags(corpus, tmp_path / "out", 2))


def test_cli_exit_code_2_on_bad_input():
    r = subprocess.run([sys.executable, "pretrain.py", "--preset", "nope"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
