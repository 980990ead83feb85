"""
The target's own tokenizer for FastDraft (Zafrir et al. 2024, arXiv 2411.11055).

A draft model is only usable for speculative decoding if it shares the target's vocabulary exactly, so every
token this project trains on or decodes comes from the target's tokenizer, rebuilt here from whatever file the
target ships (GGUF metadata, tokenizer.json, a tiktoken rank file or a sentencepiece model) and run by tiktoken
or sentencepiece.
"""
import base64
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from checkpoint import gguf_metadata, resolve_spec
from common import UserError

# -----------------------------------------------------------------------------
# 1. Pre-tokenizers and special tokens

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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    # unprintable bytes are shifted past 255 so that every byte has a visible stand-in
    shifted = {b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in printable)}
    return {b: shifted.get(b, chr(b)) for b in range(256)}


# -----------------------------------------------------------------------------
# 2. The tokenizer

class Tokenizer:
    """The target's tokenizer: text <-> ids, special tokens kept apart, and its chat template. Behind it, tiktoken
    (byte-level BPE: SmolLM2, Llama-3, GPT-2-style tokenizer.json) or sentencepiece (Llama-2, Mistral, Phi-3).
    encode() never produces a special token: a prompt that contains "<|im_end|>" cannot forge the end of a turn."""

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
        # a text whose UTF-8 holds none of these bytes cannot produce a placeholder: encode() skips the filter
        missing = b"".join(enc.decode_single_token_bytes(i) for i in self._drop_ids)
        self._drop_bytes = re.compile(b"[" + re.escape(missing) + b"]") if missing else None
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
        return self._drop_missing(text, self.enc.encode_ordinary(text))

    def encode_batch(self, texts):
        """Many texts at once, on several threads (tiktoken and sentencepiece release the GIL)."""
        texts = list(texts)
        threads = min(8, os.cpu_count() or 1)
        if self.sp is not None:
            return self.sp.encode(texts, num_threads=threads)
        batch = self.enc.encode_ordinary_batch(texts, num_threads=threads)
        return [self._drop_missing(text, ids) for text, ids in zip(texts, batch)]

    def _drop_missing(self, text, ids):
        """Remove the placeholder ids of bytes the vocabulary lacks (see _from_bpe), as Hugging Face does."""
        if self._drop_bytes is None or not self._drop_bytes.search(text.encode("utf-8", errors="surrogatepass")):
            return ids
        return [i for i in ids if i not in self._drop_ids]

    def decode_bytes(self, ids):
        """ids -> raw bytes (a partial UTF-8 character stays partial, for streaming output)."""
        ids = [int(i) for i in ids]
        if self.sp is None:
            try:
                return self.enc.decode_bytes(ids)
            except KeyError:  # ids that are no token (e.g. padding rows of the embedding) decode to nothing
                return b"".join(self.token_bytes(i) for i in ids if i not in self._drop_ids)
        out = b"".join(map(self.token_bytes, ids))
        # sentencepiece marks the start of a text with a space ("dummy prefix"); it is not part of the text
        if ids and self._sp_dummy_prefix and out.startswith(b" ") and self.token_bytes(ids[0]).startswith(b" ") \
                and not self.sp.is_byte(ids[0]):
            out = out[1:]
        return out

    def decode(self, ids):
        """ids -> text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The byte string of one token (special tokens: their text; an id that is no token: b"")."""
        if self.sp is not None:
            return self._sp_bytes[i] if 0 <= i < len(self._sp_bytes) else b""
        try:
            return self.enc.decode_single_token_bytes(i)
        except KeyError:
            return b""

    def fingerprint(self):
        """sha256 over the ordered token byte strings: two tokenizers with the same fingerprint share a vocabulary."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i in range(self.enc.n_vocab if self.sp is None else len(self._sp_bytes)):
                b = self.token_bytes(i)
                h.update(struct.pack("<I", len(b)) + b)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- chat --
    def chat(self, messages, add_generation_prompt=True):
        """messages [{"role", "content"}] -> ids in the target's chat format (ChatML, Llama-3, Phi-3, written by
        hand), ending with the assistant prefix; the messages are encoded as ordinary text, as Hugging Face does."""
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


# -----------------------------------------------------------------------------
# 3. Loading: one constructor per file format

def load_tokenizer(spec):
    """spec -> Tokenizer: "smollm2" | .gguf | HF folder (tokenizer.json / tokenizer.model) | our draft folder
    (its config.json names the target's tokenizer) | tokenizer.json | tiktoken rank file | sentencepiece .model."""
    spec = str(spec)
    if spec != "smollm2" and not Path(spec).expanduser().exists():
        raise UserError(f"no such tokenizer file or folder: {spec}")
    path = Path(resolve_spec(spec))  # resolves the model alias "smollm2" too
    if not path.is_dir():
        return _load_tokenizer_file(path, spec)
    cfg = _read_json(path / "config.json", missing={})
    if (cfg.get("fastdraft") or {}).get("tokenizer"):  # a draft saved by checkpoint.save_model: its target's spec
        return load_tokenizer(cfg["fastdraft"]["tokenizer"])
    names = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
    found = [path / n for n in names if (path / n).is_file()] or sorted(path.glob("*.gguf"))
    if not found:
        raise UserError(f"{spec}: no tokenizer.json, tokenizer.model or .gguf file in this folder")
    tok = _load_tokenizer_file(found[0], spec)
    if isinstance(cfg.get("vocab_size"), int) and cfg["vocab_size"] > tok.vocab_size:
        tok.vocab_size = cfg["vocab_size"]  # e.g. Phi-3: 32,011 tokens in a 32,064-row embedding
    return tok


def _read_json(path, missing=None):
    """A JSON file's content; `missing` when the file does not exist (None: that is an error)."""
    if missing is not None and not Path(path).is_file():
        return missing
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
    Hugging Face merges the pair listed first in `merges`. Rank = token id gives the same result when merged tokens
    were numbered in merge order, as BPE vocabularies are built (checked here; the tests compare on 1 MB of text).
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
    merged = [ranks.get(bytes(u2b[c] for c in (m.replace(" ", "", 1) if isinstance(m, str) else "".join(m))), -1)
              for m in merges or []]
    if any(x >= y for x, y in zip(merged, merged[1:])):
        raise UserError(f"{spec}: token ids are not in merge order; this BPE cannot be run by tiktoken")
    # bytes the vocabulary lacks (Hugging Face drops them when there is no unk token): give them placeholder
    # ranks past the vocabulary, which encode() then removes, so tiktoken never meets an unknown byte.
    n = len(tokens)
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({b: n + k for k, b in enumerate(missing)})
    enc = tiktoken.Encoding(name=f"fastdraft:{spec}", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=special)
    return Tokenizer(spec, special, vocab_size=n, bos_id=bos_id, eos_id=eos_id, enc=enc, add_bos=add_bos,
                     default_system=default_system, drop_ids=range(n, n + len(missing)))


def _from_gguf(path, spec):
    """GGUF tokenizer metadata (llama.cpp): "gpt2" = byte-level BPE -> tiktoken; "llama" = sentencepiece."""
    keys = ["tokenizer.chat_template"] + ["tokenizer.ggml." + k for k in (
        "model", "pre", "tokens", "token_type", "scores", "merges", "bos_token_id", "eos_token_id", "add_bos_token",
        "add_space_prefix")]
    get = gguf_metadata(path, keys).get
    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path} has no tokenizer in its metadata")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    if model == "gpt2":
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
                            f"{', '.join(sorted(GGUF_PRE_PATTERNS))})")
        return _from_bpe(spec, tokens, get("tokenizer.ggml.merges"), special, GGUF_PRE_PATTERNS[pre],
                         get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id"),
                         add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                         default_system=_default_system(get("tokenizer.chat_template")))
    if model == "llama":
        proto = _sentencepiece_proto(tokens, get("tokenizer.ggml.scores") or [0.0] * len(tokens), types,
                                     add_dummy_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)))
        return _from_sentencepiece(proto, spec)
    raise UserError(f"{path}: tokenizer type {model!r} is not supported (supported: gpt2, llama)")


def _sentencepiece_proto(tokens, scores, types, add_dummy_prefix=True):
    """A serialized sentencepiece model from a GGUF vocabulary (llama.cpp's token types are sentencepiece's),
    built with the protobuf schema that ships inside the sentencepiece package."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf (requirements.txt)
    m = pb.ModelProto(
        pieces=[pb.ModelProto.SentencePiece(piece=p, score=s, type=t) for p, s, t in zip(tokens, scores, types)],
        # as in Llama: BPE over the pieces' scores, unk/bos/eos ids 0/1/2, no padding, the text taken as it is
        trainer_spec=pb.TrainerSpec(model_type=pb.TrainerSpec.BPE, byte_fallback=6 in types,
                                    unk_id=types.index(2) if 2 in types else 0, bos_id=1, eos_id=2, pad_id=-1),
        normalizer_spec=pb.NormalizerSpec(name="identity", add_dummy_prefix=add_dummy_prefix,
                                          remove_extra_whitespaces=False, escape_whitespaces=True))
    return m.SerializeToString()


def _default_system(template):
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2 has one)."""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template if isinstance(template, str) else "", re.S)
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
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in [*vocab.items(), *added.items()]:
        tokens[i] = t
    # ids missing from both tables are holes: special tokens no text can produce
    special = {**added, **{f"<|hole_{i}|>": i for i, t in enumerate(tokens) if t is None}}
    cfg = _read_json(Path(path).parent / "tokenizer_config.json", missing={})
    ids = {**vocab, **special}

    def tok_id(v):  # tokenizer_config.json names a token as "text" or {"content": "text", ...}
        return ids.get(v.get("content") if isinstance(v, dict) else v)
    bos, eos = tok_id(cfg.get("bos_token")), tok_id(cfg.get("eos_token"))
    if eos is None:
        eos = next((special[t] for t in STOP_TOKENS if t in special), None)
    if eos is None:
        raise UserError(f"{path}: cannot tell the end-of-text token (no tokenizer_config.json eos_token)")
    add_bos = bool(cfg.get("add_bos_token", "<|begin_of_text|>" in special))
    return _from_bpe(spec, tokens, model.get("merges"), special, pattern, bos, eos, add_bos=add_bos,
                     default_system=_default_system(cfg.get("chat_template")))


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
    import tiktoken
    lines = [line.split() for line in Path(path).read_bytes().splitlines() if line.strip()]
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
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
    added = {}
    if siblings is not None:
        added.update(_read_json(siblings / "added_tokens.json", missing={}))
        dec = _read_json(siblings / "tokenizer_config.json", missing={}).get("added_tokens_decoder") or {}
        added.update({v["content"]: int(k) for k, v in dec.items()})
    added = {t: i for t, i in added.items() if i >= n}
    special.update(added)
    table = [b""] * (max([n - 1] + list(added.values())) + 1)  # token id -> its bytes
    for i in range(n):
        piece = sp.id_to_piece(i)
        table[i] = (bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else " \u2047 ".encode() if sp.is_unknown(i) else
                    piece.encode() if sp.is_control(i) else piece.replace("\u2581", " ").encode())
    for t, i in added.items():
        table[i] = t.encode()
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = added.get("<|endoftext|>", sp.eos_id()) if sp.eos_id() >= 0 or added else None
    tok = Tokenizer(spec, special, vocab_size=len(table), bos_id=bos, eos_id=eos, sp=sp, add_bos=bos is not None)
    tok._sp_bytes = table
    tok._sp_dummy_prefix = any(p.startswith("\u2581") for p in sp.encode("a", out_type=str)[:1])
    return tok


# -----------------------------------------------------------------------------
# 4. The vocabulary: the one check, and the subset a trimmed draft head keeps

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


def check_draft_vocab(expected, draft_spec, vocab_size, what="the draft"):
    """check_same_vocab against the draft's size and, when its tokenizer can be found, its tokens too (a draft
    folder whose tokenizer is not on this machine is checked by size alone)."""
    try:
        tok = load_tokenizer(draft_spec)
    except UserError:
        tok = None
    check_same_vocab(expected, tok, vocab_size, what)


def frequent_ids(token_lists, k, tok):
    """The k token ids a trimmed draft head keeps (VocabTrim, arXiv 2506.22694; FR-Spec, arXiv 2502.14856): the
    special tokens first, by id, then the ids most frequent in token_lists, ties (and ids never seen) by the
    smaller id, so the same data always gives the same list. "Special" is every id a template or the stop rule
    needs, however rare in text: tok.special (control, user-defined and added tokens, tokenizer.json holes,
    Llama-3's 256 reserved tokens), tok.stop_ids (may include an ordinary token named eos) and bos."""
    keep = sorted(set(tok.special.values()) | set(tok.stop_ids) | ({tok.bos_id} - {None}))
    if not isinstance(k, (int, np.integer)) or not len(keep) <= k <= tok.vocab_size:
        raise UserError(f"a trimmed vocabulary of {tok.spec!r} needs {len(keep)} <= k <= {tok.vocab_size} (its "
                        f"special tokens, up to the whole vocabulary); got k={k!r}")
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for ids in token_lists:
        ids, n = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        if ids.size and (ids[0] < 0 or ids[-1] >= tok.vocab_size):
            raise UserError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} is not in {tok.spec!r}'s vocabulary")
        counts[ids] += n
    counts[keep] = -1  # already in: sorted behind every other id, never reached by the cut below
    order = np.argsort(-counts, kind="stable")  # most frequent first; stable: equal counts stay in id order
    return keep + order[:k - len(keep)].tolist()
