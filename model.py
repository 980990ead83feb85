"""
The draft (and target) transformer: a Llama-family decoder written by hand, its static KV cache, draft presets.

FastDraft (Zafrir et al. 2024, arXiv 2411.11055) trains small Llama-style drafts that share the target's vocabulary;
speculative decoding (Leviathan et al. 2023) needs both models to decode incrementally and to roll back cheaply.
So one architecture covers the targets (SmolLM2, Llama-3, Mistral, Phi-3: "Llama with small changes") and the
drafts, and the KV cache is a static buffer written at explicit positions: rolling back is writing from an earlier
position next time (gpt-fast's design).
"""

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from common import UserError


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
    rope_scaling: dict | None = None   # None, or as in HF configs: LLAMA3_ROPE below, {"rope_type": "linear", "factor"}
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
#   cpu-small      : 4 x 256, ~3.1M non-embedding + 12.6M embedding at 49k vocab. Default CPU draft for SmolLM2-135M
#                    (30 x 576): ~1/7 of its depth, so a draft step is a small fraction of a target step.
#   cpu-base       : 6 x 288, ~5.3M non-embedding + 14.2M embedding at 49k vocab (~19.5M total).
#   fastdraft-50m  : 4 x 768, ~25.2M non-embedding + 24.6M embedding at Phi-3's 32064 vocab (~49.8M total).
#   fastdraft-150m : 8 x 768, ~50.3M non-embedding + 98.5M embedding at Llama-3's 128256 vocab (~149M total),
#                    with Llama-3's rope theta and frequency scaling so its positions behave like the target's.
# vocab_size here is replaced by the tokenizer's vocabulary at train time.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
PRESETS = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    "cpu-small": ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, rope_theta=1e5),
    "cpu-base": ModelConfig(dim=288, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=768, rope_theta=1e5),
    "fastdraft-50m": ModelConfig(vocab_size=32064, dim=768, n_layers=4, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                                 max_seq_len=4096),
    "fastdraft-150m": ModelConfig(vocab_size=128256, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                                  max_seq_len=4096, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
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
    t = torch.arange(length, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, rope_frequencies(config).to(device))  # (L, d/2)
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
    """Grouped-query attention (Ainslie et al. 2023) with RoPE and a static KV cache. q, k, v come from one fused
    projection (rows [q; k; v], Phi-3's layout): at batch size 1 decoding is a chain of small kernels, and one matmul
    plus one RoPE call instead of three plus two is measurably faster (checkpoints keep HF's q/k/v_proj)."""

    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        # (B, n_kv, S, hd) once setup_cache() ran. Buffers, not plain attributes: module state that moves with
        # .to(), and that CUDA graphs treat as static memory rather than an input to copy in every step.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, cos, sin, slots=None, n_keys=None, mask=None):
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hd)
        qk = apply_rope(qkv[:, :nh + nkv], cos, sin)   # q and k heads rotated together
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]   # (B, nh, T, hd), (B, nkv, T, hd) x2
        if slots is not None:  # decoding: write this step's keys/values at their slots, attend over the cache
            self.k_cache[:B].index_copy_(2, slots, k)
            self.v_cache[:B].index_copy_(2, slots, v)
            k, v = self.k_cache[:B, :, :n_keys], self.v_cache[:B, :, :n_keys]          # (B, nkv, n_keys, hd)
        y = attend(q, k, v, mask)                                                       # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_dim)                         # (B, T, C)
        return self.o_proj(y)


# enable_gqa lets SDPA share kv heads without copying them; torch >= 2.5 has it (Gaudi images before 1.19 ship
# 2.4), and mps and hpu do not implement it
SDPA_HAS_GQA = TorchVersion(torch.__version__) >= (2, 5)


def attend(q, k, v, mask=None):
    """Softmax attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd), each kv head shared by nh/nkv query heads.
    mask None: causal over the sequence itself (training); else mask (B or 1, 1, T, S) says which keys each query
    sees (decoding from the cache, cache_mask)."""
    B, nh, T, hd = q.shape
    rep, causal = nh // k.size(1), mask is None
    if rep > 1 and SDPA_HAS_GQA and (q.device.type == "cpu" or causal and q.device.type == "cuda"):
        # fused kernels that share the kv heads themselves: the CPU's, masked or not; CUDA's flash, causal only
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    if rep > 1 and not causal:
        # Elsewhere, masked: the rep query heads that share a kv head become rep * T rows of one query, i.e. plain
        # masked attention over nkv heads, which fused kernels take (masked enable_gqa falls to CUDA's math path,
        # which repeats k and v), and no copy of the cache. Rows r*T + t: query head r of the group, token t.
        y = F.scaled_dot_product_attention(q.reshape(B, k.size(1), rep * T, hd), k, v,       # (B, nkv, rep*T, hd)
                                           attn_mask=mask.repeat(1, 1, rep, 1))
        return y.view(B, nh, T, hd)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)         # (B, nh, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def cache_mask(slots, n_keys, pad=None):
    """Which of the first n_keys cache slots each query at `slots` (T,) sees -> (B or 1, 1, T, n_keys). Slot j is
    visible from slot i iff j <= i: that hides the future, the stale slots a rejected draft left behind, and the
    unused tail of a bucketed read. pad (B,): row b's first pad[b] slots are left padding and never seen (a padding
    query sees itself only, so no softmax row is empty)."""
    i = slots[:, None]                                                    # (T, 1)
    j = torch.arange(n_keys, device=slots.device)                        # (n_keys,)
    mask = j <= i                                                         # (T, n_keys)
    if pad is not None:
        mask = mask & ((j >= pad.view(-1, 1, 1)) | (j == i))               # (B, T, n_keys)
    return mask.view(-1, 1, len(slots), n_keys)


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

    def forward(self, x, cos, sin, slots, n_keys, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, n_keys, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A Llama-family decoder: embedding, n_layers pre-norm blocks, final RMSNorm, tied or untied head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own random init: _init_weights below does it, and on the meta device
        # (load_model) that init would only cost time (it pulls in torch._dynamo, ~3 s).
        V, C = config.vocab_size, config.dim
        self.embed_tokens = nn.Embedding(V, C, _weight=torch.empty(V, C))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied: the head reuses embed_tokens.weight (SmolLM2 and our drafts); untied: its own matrix.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # (K,) the vocabulary ids a trimmed head predicts (trim_head); None: all of them. Saved beside the weights.
        self.register_buffer("head_ids", None, persistent=False)
        self._head_rows = None  # a tied trimmed head's rows of the embedding, kept between decoding steps
        self.cache_len = 0
        self.cache_bucket = 1   # > 1: static shapes, the cache read in buckets of this many slots (keys_to_read)
        self._packed_head = None  # the head's weight prepacked for oneDNN (prepack_for_cpu)
        self.reset_rope()
        self.apply(self._init_weights)

    def _init_weights(self, module):  # GPT-2 / Llama style: N(0, 0.02) everywhere, norms at one (nn.Module default)
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_rope(self, length=None):
        """(Re)build the cos/sin tables; on the meta device they are placeholders until load_model calls this again."""
        length = length or min(self.config.max_seq_len, 4096)  # grown on demand (Llama-3.1 says 131072)
        cos, sin = rope_tables(self.config, length, self.embed_tokens.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, hd) float32
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- KV cache ---------------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len=None):
        """Make room for batch_size rows of max_seq_len slots in every layer's k/v cache (B, n_kv, S, hd). A cache
        that is big enough is kept (its old slots are masked until overwritten); a new one is allocated at a power
        of two >= 256 slots, so prompts of other lengths reuse it and a compiled graph keeps its shapes. S defaults
        to the config's context, capped at 4096 (a Llama-3.1 full context would be GBs)."""
        S = max_seq_len or min(self.config.max_seq_len, 4096)
        w, cache = self.embed_tokens.weight, self.layers[0].self_attn.k_cache
        if cache is not None and cache.size(0) >= batch_size and cache.size(2) >= S and cache.dtype == w.dtype \
                and cache.device == w.device:
            return
        S = max(256, 1 << (S - 1).bit_length())
        shape = (batch_size, self.config.n_kv_heads, S, self.config.head_dim)
        for layer in self.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.cache_len = S
        if S > self.rope_cos.size(0):
            self.reset_rope(S)

    def keep_cache_rows(self, rows, length):
        """Keep only the batch rows `rows` of the cache (slots [0, length)), moved to the front in that order: the next
        forward with B = len(rows) continues exactly these rows (a batch drops finished rows, recomputing nothing)."""
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

    def forward(self, idx, input_pos=None, last_n=None, pad=None):
        """Logits (B, T, V) float32 (V: K when the head is trimmed), or (B, last_n, V) when last_n is given.
        input_pos None: causal forward over idx alone (training). input_pos int: idx are written into the KV
        cache at slots [input_pos, input_pos+T) and attend to slots [0, input_pos+t] only; calling again with an
        earlier input_pos rolls back. pad (B,): left-padding counts, row b's slots [0, pad[b]) are never seen."""
        h = self.hidden(idx, input_pos=input_pos, pad=pad)
        if last_n is not None:
            h = h[:, -last_n:]
        return self.head(h)

    def hidden(self, idx, input_pos=None, pad=None):
        """Final-normed hidden states (B, T, dim), before the head (the trainer chunks its cross-entropy)."""
        B, T = idx.shape
        start = 0 if input_pos is None else int(input_pos)
        if input_pos is not None and start + T > self.cache_len:
            raise ValueError(f"positions up to {start + T} do not fit the KV cache of {self.cache_len} (setup_cache)")
        if pad is not None and input_pos is None:
            raise ValueError("pad needs the KV cache (input_pos)")
        if start + T > self.rope_cos.size(0):
            self.reset_rope(max(start + T, 2 * self.rope_cos.size(0)))
        slots = torch.arange(start, start + T, device=idx.device)              # (T,) built on the device
        if input_pos is None:  # training: the sequence attends to itself, causally
            pos, n_keys, slots, mask = slots, T, None, None
        else:
            n_keys = self.keys_to_read(start + T)
            pos = slots if pad is None else (slots - pad.view(-1, 1, 1)).clamp(min=0)  # (T,) or (B, 1, T)
            mask = cache_mask(slots, n_keys, pad)
        x = self.embed_tokens(idx)                                              # (B, T, C)
        cos, sin = self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype)  # (T, hd) or (B, 1, T, hd)
        return self.blocks(x, cos, sin, slots, n_keys, mask)

    def blocks(self, x, cos, sin, slots, n_keys, mask):
        """The decoder layers and the final norm: every tensor here has a shape fixed by (B, T, n_keys), so this is
        the part to torch.compile (compile_blocks) without a new graph per token."""
        for layer in self.layers:
            x = layer(x, cos, sin, slots, n_keys, mask)
        return self.norm(x)

    def prefill(self, idx):
        """Write a prompt idx (B, T) into the cache at slots [0, T), computing no logits. With static shapes
        (cache_bucket > 1) it is padded at its end to a whole bucket: one graph per bucket of prompt lengths, and
        the padding's slots lie past the prompt, hidden by the mask until the next tokens overwrite them."""
        pad = -idx.size(1) % self.cache_bucket
        self.hidden(F.pad(idx, (0, pad)) if pad else idx, input_pos=0)

    def keys_to_read(self, end):
        """Cache slots attention reads when the last token sits at slot end-1: `end`, or with cache_bucket > 1 the next
        multiple of it, so a compiled graph sees a new length every bucket, not every token (masks hide the rest)."""
        b = self.cache_bucket
        return end if b <= 1 else min(self.cache_len, -(-end // b) * b)

    def compile_blocks(self, bucket=64, **kwargs):
        """torch.compile the layers with static shapes: the cache read in buckets of `bucket` slots, prompts padded
        to them, so decoding compiles one graph per (T, bucket), not one per token (positions and masks arrive as
        tensors). kwargs go to torch.compile (mode="reduce-overhead": CUDA graphs, the caches being buffers)."""
        self.cache_bucket = bucket
        # dynamo keeps at most cache_size_limit graphs per code object (8 by default) and every model's blocks() is the
        # same code: a target and its draft, each at a few (T, bucket) shapes, would silently fall back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.blocks = torch.compile(self.blocks, **kwargs)
        return self

    # -- the head ---------------------------------------------------------------------------------

    def head(self, h):
        """Output projection (tied or untied) to float32 logits (..., V), or (..., K) over head_ids when trimmed."""
        if self._packed_head is not None:
            return packed_linear(h, self._packed_head).float()
        if self.lm_head is not None:
            return F.linear(h, self.lm_head.weight).float()
        w = self.embed_tokens.weight
        if self.head_ids is None:
            return F.linear(h, w).float()
        if self.training or torch.is_grad_enabled():  # gradients flow through the gather to the embedding
            return F.linear(h, w[self.head_ids]).float()
        key = (w.data_ptr(), w._version, w.dtype)       # decoding: gather the K rows once, not every step
        if self._head_rows is None or self._head_rows[0] != key:
            self._head_rows = (key, w[self.head_ids].contiguous())
        return F.linear(h, self._head_rows[1]).float()

    def train(self, mode=True):
        """nn.Module.train, and the head rows kept for decoding are dropped: weights change while training, and a
        fused optimizer (AdamW(fused=True), the default on CPU and CUDA) updates them without bumping `_version`."""
        self._head_rows = None
        return super().train(mode)

    @property
    def is_trimmed(self):
        """True when the head predicts a subset of the vocabulary (trim_head)."""
        return self.head_ids is not None

    def to_vocab(self, logits):
        """A trimmed head's logits (..., K) -> (..., V) over the whole vocabulary, -inf (probability zero) for the
        tokens it lacks, so a sampled position is a vocabulary id; a whole head's logits pass through."""
        if self.head_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))  # (..., V)
        return full.index_copy_(-1, self.head_ids, logits)

    def trim_head(self, ids):
        """Predict only the tokens `ids` (VocabTrim, arXiv 2506.22694; FR-Spec, arXiv 2502.14856). The model still
        reads every token; its logits cover the K ids, in this order, and a token outside them has probability zero,
        so speculative sampling stays exact (it just cannot propose that token)."""
        if self.head_ids is not None:
            raise UserError("this model's head is trimmed already")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.embed_tokens.weight.device)
        if ids.dim() != 1 or len(ids) == 0 or len(set(ids.tolist())) != len(ids) or \
                int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise UserError(f"a head subset needs distinct token ids in [0, {self.config.vocab_size})")
        if self.lm_head is not None:
            rows = self.lm_head.weight.detach()[ids]
            self.lm_head = nn.Linear(self.config.dim, len(ids), bias=False, device=rows.device, dtype=rows.dtype)
            self.lm_head.weight.data.copy_(rows)
        self.head_ids, self._head_rows, self._packed_head = ids, None, None
        return self

    def head_index(self, token_ids):
        """Positions of vocabulary ids in the head's output (-1 where the trimmed head lacks a token)."""
        if self.head_ids is None:
            return token_ids
        where = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.head_ids.device)
        where[self.head_ids] = torch.arange(len(self.head_ids), device=self.head_ids.device)
        return where[token_ids]

    def num_params(self, non_embedding=False):
        """Parameter count; non_embedding=True leaves out the vocabulary matrices (embedding and head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in (self.embed_tokens, self.lm_head) if m is not None)
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls (N: the non-embedding weights plus the head's rows, K of
        them when trimmed) plus 12 * layers * heads * head_dim * seq_len for attention scores (PaLM appendix B)."""
        c = self.config
        head_rows = c.vocab_size if self.head_ids is None else len(self.head_ids)
        n = self.num_params(non_embedding=True) + head_rows * c.dim
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


# -----------------------------------------------------------------------------
# Optional: bf16 decoding on a CPU, without oneDNN's per-call weight reorder

def packed_linear(x, packed):
    """x @ w.T for a weight w prepacked by prepack_for_cpu."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def prepack_for_cpu(model):
    """Prepack a bf16 model's weights once, in the blocked layout oneDNN's bf16 kernels read; elsewhere (fp32,
    not a CPU, no oneDNN) nothing changes. F.linear reorders a bf16 weight on every call: on an AMX Xeon that is a
    fixed ~70 us at one row, which made bf16 decoding no faster than fp32's despite half the bytes. The packed
    copies add the weights' memory again and no longer follow them: for decoding, after loading. -> model"""
    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return model

    def pack(weight):  # the batch-size hint 1: decoding's one row (more rows still work)
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.forward = functools.partial(packed_linear, packed=pack(m.weight))
    rows = model.lm_head.weight if model.lm_head is not None else w if model.head_ids is None else w[model.head_ids]
    model._packed_head = pack(rows)
    return model
