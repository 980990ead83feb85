"""model.py: our transformer computes what transformers computes, for every way a model arrives (GGUF, HF folders,
our own folders); the KV cache is exact; bad input fails with one clear UserError."""
import copy
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import common
import model as M
from conftest import tiny_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")



def hf_gguf(path):
    """transformers' own reading of a GGUF (from_pretrained(gguf_file=...) when accelerate is there, which that
    path requires; otherwise the same conversion function it calls, loaded into LlamaForCausalLM)."""
    try:
        import accelerate  # noqa: F401
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    except ImportError:
        pass
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = transformers.LlamaConfig(**load_gguf_checkpoint(path)["config"])
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    sd = load_gguf_checkpoint(path, return_tensors=True, model_to_load=m)["tensors"]
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False, assign=True)
    m.tie_weights()
    m.model.rotary_emb = type(m.model.rotary_emb)(config=cfg)  # its buffers were on meta
    return m.eval()


# -----------------------------------------------------------------------------
# The real target: SmolLM2-135M-Instruct Q4_1

@pytest.fixture(scope="module")
def smollm2_pair(smollm2):
    return smollm2, hf_gguf(checkpoint.resolve_spec("smollm2"))


def test_smollm2_logits_match_transformers(smollm2_pair):
    ours, theirs = smollm2_pair
    assert ours.config.n_layers == 30 and ours.config.dim == 576 and ours.config.tie_embeddings
    prompts = [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198],
        [504, 3458, 282, 4649, 314, 4103, 30, 378, 3458, 282, 4649, 314],
        list(range(100, 40000, 3333)),
    ]
    with torch.no_grad():
        for p in prompts:
            idx = torch.tensor([p])
            a, b = ours(idx), theirs(idx).logits
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_smollm2_bfloat16_logits_are_close_to_transformers_bfloat16(smollm2_pair, smollm2_tok):
    """In bf16 both implementations round differently (fused projections, kernel order, the CPU's own kernels),
    so the bar is measured here: ours is as close to the float32 logits as transformers' bf16 is, and both pick
    the same greedy token wherever the gap is wider than what rounding moved either of them."""
    idx = torch.tensor([smollm2_tok.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")])
    ours, theirs = (copy.deepcopy(m).to(torch.bfloat16) for m in smollm2_pair)
    with torch.no_grad():
        ref = smollm2_pair[0](idx)[0]
        a, b = ours(idx)[0].float(), theirs(idx).logits[0].float()
    err_ours, err_theirs = (a - ref).abs(), (b - ref).abs()
    assert err_ours.mean() > 1e-3 and err_theirs.mean() > 1e-3   # both really ran in bf16
    assert err_ours.mean() < 2 * err_theirs.mean() and err_ours.max() < 2 * err_theirs.max()
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * max(err_ours.max(), err_theirs.max())   # no rounding flips these
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear]) and clear.sum() >= len(clear) // 4


def test_smollm2_cached_decoding_matches_full_forward(smollm2_pair):
    ours, _ = smollm2_pair
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        full = ours(idx)
        ours.setup_cache(1, 16)
        steps = [ours(idx[:, :5], input_pos=0, last_n=1)]
        steps += [ours(idx[:, t:t + 1], input_pos=t) for t in range(5, 7)]
        ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# Hugging Face folders in, our folders out

def hf_llama(tie=False, rope_scaling=None):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=500000.0 if rope_scaling else 10000.0, rope_scaling=rope_scaling, bos_token_id=1,
        eos_token_id=2)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def ids(T=24, B=2, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, theirs, idx, atol=1e-4):
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits.float(), atol=atol, rtol=0)


def test_hf_llama_folder_loads_with_same_logits(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "llama")
    ours = checkpoint.load_model(tmp_path / "llama")
    assert not ours.config.tie_embeddings and ours.config.eos_id == 2
    assert_same_logits(ours, hf, ids())


def test_sharded_hf_folder_loads(tmp_path):
    hf = hf_llama(tie=True)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_same_logits(checkpoint.load_model(tmp_path / "sharded"), hf, ids())


def test_hf_phi3_folder_splits_fused_projections(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "phi3")
    assert_same_logits(checkpoint.load_model(tmp_path / "phi3"), hf, ids())


def test_hf_mistral_folder_loads_with_same_logits(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False)
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mistral")
    assert_same_logits(checkpoint.load_model(tmp_path / "mistral"), hf, ids())


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = hf_llama(rope_scaling=scaling)
    hf.save_pretrained(tmp_path / "l3")
    ours = checkpoint.load_model(tmp_path / "l3")
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(M.rope_frequencies(ours.config), hf.model.rotary_emb.inv_freq.float())
    assert_same_logits(ours, hf, ids(T=100, B=1))


@pytest.mark.parametrize("tie", [True, False])
def test_save_model_loads_in_transformers_and_round_trips(tmp_path, tie):
    ours = tiny_model(tie_embeddings=tie, bos_id=1, eos_id=2, eos_ids=[3], tokenizer="smollm2",
                      rope_scaling=None if tie else {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32})
    checkpoint.save_model(ours, tmp_path / "draft", extra={"step": 7})
    cfg = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["fastdraft"]["tokenizer"] == "smollm2" and cfg["fastdraft"]["step"] == 7
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert_same_logits(ours, hf, ids())
    again = checkpoint.load_model(tmp_path / "draft")
    assert again.config == ours.config
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), ours(ids()), atol=0, rtol=0)


def test_save_model_replaces_atomically(tmp_path):
    checkpoint.save_model(tiny_model(seed=0), tmp_path / "d")
    checkpoint.save_model(tiny_model(seed=1), tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(tmp_path / "d")(ids()), tiny_model(seed=1)(ids()))


# -----------------------------------------------------------------------------
# GGUF files we write ourselves: every supported storage type, llama.cpp's q/k row order

def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to q/k rows (HF rotate-half order -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_bytes(rows, cols, qtype, seed=0):
    """Random but valid Q4_K / Q6_K blocks (gguf can dequantize these types but not produce them)."""
    from gguf import GGMLQuantizationType as Q
    block = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, block), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:   # block = d, dmin (fp16), 12 bytes of 6-bit scales, 128 bytes of nibbles
        data[:, :, 0:2] = scale
        data[:, :, 2:4] = scale
    else:                 # block = 128 low nibbles, 64 high bits, 16 int8 scales, d (fp16)
        data[:, :, 208:210] = scale
    return data.reshape(rows, -1)


def write_gguf(path, m, arch="llama", types=None, k_quants=None):
    """Write our model as llama.cpp would; returns the state dict the file really holds (after quantization)."""
    from gguf import GGMLQuantizationType as Q
    c = m.config
    types = types or [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {v: k for k, v in checkpoint._GGUF_NAMES.items()}
    expected = {}
    for i, (name, t) in enumerate(checkpoint.hf_state_dict(m).items()):
        a = t.float().numpy()
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, n, rest = name.split(".", 2)
            gname = f"blk.{n}.{names[rest[:-len('.weight')]]}.weight"
        if gname.endswith("attn_q.weight"):
            a = llamacpp_permute(a, c.n_heads)
        elif gname.endswith("attn_k.weight"):
            a = llamacpp_permute(a, c.n_kv_heads)
        qtype = Q.F32 if a.ndim == 1 else types[i % len(types)]
        data = gguf.quants.quantize(a, qtype) if qtype != Q.F32 else a
        if gname in (k_quants or {}):
            qtype = k_quants[gname]
            data = k_quant_bytes(*a.shape, qtype, seed=i)
        w.add_tensor(gname, data, raw_dtype=qtype)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(a.shape).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, n_head in (("q_proj", c.n_heads), ("k_proj", c.n_kv_heads)):  # what our loader must recover
        for layer in range(c.n_layers):
            key = f"layers.{layer}.self_attn.{name}.weight"
            expected[key] = unpermute_ref(expected[key], n_head)
    return expected


def unpermute_ref(w, n_head):
    """The inverse of llamacpp_permute, written independently of checkpoint._unpermute."""
    rows, dim = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_dequantizes_and_unpermutes(tmp_path, tie):
    m = tiny_model(tie_embeddings=tie)
    expected = write_gguf(tmp_path / "m.gguf", m)
    loaded = checkpoint.load_model(tmp_path / "m.gguf")
    assert loaded.config.tie_embeddings == tie and loaded.config.eos_id == 2
    sd = {k.removeprefix("model."): v for k, v in checkpoint.hf_state_dict(loaded).items()}
    assert set(sd) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(sd[name], t, atol=0, rtol=0, msg=name)
    # float32 storage only: the GGUF model computes exactly what the original does
    write_gguf(tmp_path / "f32.gguf", m, types=[gguf.GGMLQuantizationType.F32])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(tmp_path / "f32.gguf")(ids()), m(ids()), atol=1e-5, rtol=0)


def test_gguf_k_quants_load(tmp_path):
    from gguf import GGMLQuantizationType as Q
    m = tiny_model(ffn_dim=256)  # K-quants pack rows in blocks of 256
    expected = write_gguf(tmp_path / "k.gguf", m, types=[Q.F32],
                          k_quants={"blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K})
    sd = {k.removeprefix("model."): v for k, v in checkpoint.hf_state_dict(checkpoint.load_model(tmp_path / "k.gguf")).items()}
    for name, t in expected.items():
        torch.testing.assert_close(sd[name], t, atol=0, rtol=0, msg=name)
    assert sd["layers.0.mlp.down_proj.weight"].abs().max() > 0


# -----------------------------------------------------------------------------
# The static KV cache

def test_training_forward_equals_cached_forward_and_hidden_head():
    m, x = tiny_model(), ids(T=20)
    with torch.no_grad():
        full = m(x)
        m.setup_cache(2, 32)
        torch.testing.assert_close(m(x, input_pos=0), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x, input_pos=0, last_n=3), full[:, -3:], atol=1e-5, rtol=0)
        torch.testing.assert_close(m.head(m.hidden(x)), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_incremental_decoding_matches_full_forward(kv_heads):
    m, x = tiny_model(n_kv_heads=kv_heads), ids(T=20)
    with torch.no_grad():
        full = m(x)
        m.setup_cache(2, 32)
        one = torch.cat([m(x[:, t:t + 1], input_pos=t) for t in range(20)], dim=1)
        torch.testing.assert_close(one, full, atol=1e-5, rtol=0)
        chunks, pos = [], 0
        for n in (3, 1, 5, 2, 9):
            chunks.append(m(x[:, pos:pos + n], input_pos=pos))
            pos += n
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_rewriting_from_earlier_position_equals_fresh_cache():
    m, x = tiny_model(), ids(T=16, B=1)
    junk = ids(T=6, B=1, seed=5)
    with torch.no_grad():
        m.setup_cache(1, 32)
        m(x[:, :10], input_pos=0)
        m(junk, input_pos=10)            # a rejected draft: slots 10..15 now hold stale keys
        m(junk[:, :2], input_pos=16)     # and even beyond
        rolled = m(x[:, 10:], input_pos=10)
        m.setup_cache(1, 32)
        m(x[:, :10], input_pos=0)
        fresh = m(x[:, 10:], input_pos=10)
    torch.testing.assert_close(rolled, fresh, atol=1e-6, rtol=0)
    torch.testing.assert_close(rolled, m(x)[:, 10:], atol=1e-5, rtol=0)


def test_cache_is_allocated_once_and_reused_exactly():
    """setup_cache keeps a cache that is big enough (a new one comes at a power of two >= 256 slots), and a run
    in a reused cache, over another run's stale slots, computes what a fresh model does."""
    m, a, b = tiny_model(weight_std=0.3), ids(T=30, B=1, seed=1), ids(T=12, B=1, seed=2)
    with torch.no_grad():
        m.setup_cache(1, 40)
        k = m.layers[0].self_attn.k_cache
        assert k.shape == (1, 2, 256, 16) and m.cache_len == 256
        m(a, input_pos=0)
        for B, S in ((1, 200), (1, 256)):
            m.setup_cache(B, S)
            assert m.layers[0].self_attn.k_cache is k
        reused = torch.cat([m(b[:, :5], input_pos=0)] + [m(b[:, t:t + 1], input_pos=t) for t in range(5, 12)], 1)
        torch.testing.assert_close(reused, m(b), atol=1e-4, rtol=0)
        m.setup_cache(2, 40)      # more rows: a new cache
        m.setup_cache(1, 300)     # longer: the next power of two
        assert m.layers[0].self_attn.k_cache.shape == (1, 2, 512, 16) and "k_cache" not in m.state_dict()


def test_grouped_query_attention_paths_agree(monkeypatch):
    """Training attention with SDPA's enable_gqa (torch >= 2.5) and with the kv heads repeated (torch 2.4, mps,
    hpu) compute the same, as does decoding's masked path that folds the heads sharing a kv head into rows."""
    m, x = tiny_model(n_heads=8, n_kv_heads=2, weight_std=0.3), ids(T=20)

    def cached():
        m.setup_cache(2, 32)
        return torch.cat([m(x[:, :7], input_pos=0), m(x[:, 7:8], input_pos=7), m(x[:, 8:], input_pos=8)], 1)
    with torch.no_grad():
        fused, fused_masked = m(x), cached()
        monkeypatch.setattr(M, "SDPA_HAS_GQA", False)
        repeated, folded = m(x), cached()
    for out in (fused_masked, repeated, folded):
        torch.testing.assert_close(out, fused, atol=1e-4, rtol=0)
    q, k, v = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    reference = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 4).masked_fill(
        torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")), -1) @ v.repeat_interleave(4, 1)
    torch.testing.assert_close(M.attend(q, k, v), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(M.attend(q, k, v, M.cache_mask(torch.arange(5), 5)), reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
@pytest.mark.parametrize("tie,trim", [(True, False), (True, True), (False, False)])
def test_prepacked_bfloat16_decoding_is_bfloat16_decoding(tie, trim):
    """prepack_for_cpu changes the weights' layout, not the model: its logits are as close to float32's as plain
    bf16's are (bf16 rounding, measured here), at one row and at four; fp32 models are left alone."""
    m, x = tiny_model(tie_embeddings=tie, weight_std=0.1), ids(T=12, B=1)
    if trim:
        m.trim_head(list(range(0, 128, 3)))
    ref = m(x).detach()
    assert M.prepack_for_cpu(m)._packed_head is None
    plain, packed = copy.deepcopy(m).to(torch.bfloat16), M.prepack_for_cpu(copy.deepcopy(m).to(torch.bfloat16))
    assert packed._packed_head is not None
    with torch.no_grad():
        for model in (plain, packed):
            model.setup_cache(1, 16)
        outs = [torch.cat([mm(x[:, :8], input_pos=0), mm(x[:, 8:9], input_pos=8), mm(x[:, 9:], input_pos=9)], 1)
                for mm in (plain, packed)]
    err_plain, err_packed = ((o - ref).abs().max().item() for o in outs)
    assert 0 < err_packed <= 2 * err_plain + 1e-3, (err_packed, err_plain)


def test_keeping_cache_rows_continues_exactly_those_rows():
    m, x = tiny_model(), ids(T=12, B=3, seed=4)
    with torch.no_grad():
        full = m(x)
        m.setup_cache(3, 16)
        m(x[:, :9], input_pos=0)
        m.keep_cache_rows([2, 0], 9)                # row 1 leaves; rows 2 and 0 move to the front, in that order
        rest = m(x[[2, 0], 9:], input_pos=9)
    torch.testing.assert_close(rest, full[[2, 0], 9:], atol=1e-5, rtol=0)


def test_left_padded_row_equals_unpadded_row():
    m = tiny_model()
    long, short = ids(T=12, B=1, seed=1), ids(T=7, B=1, seed=2)
    pad = torch.tensor([0, 5])
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)], 0)   # (2, 12)
    nxt = ids(T=3, B=2, seed=3)
    with torch.no_grad():
        m.setup_cache(2, 32)
        b_prefill = m(batch, input_pos=0, pad=pad, last_n=1)
        b_steps = [m(nxt[:, t:t + 1], input_pos=12 + t, pad=pad) for t in range(3)]
        m.setup_cache(1, 32)
        s_prefill = m(short, input_pos=0, last_n=1)
        s_steps = [m(nxt[1:, t:t + 1], input_pos=7 + t) for t in range(3)]
        alone_long = m(torch.cat([long, nxt[:1]], 1))
    assert torch.isfinite(b_prefill).all()
    torch.testing.assert_close(b_prefill[1], s_prefill[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(b_steps, 1)[1], torch.cat(s_steps, 1)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(b_steps, 1)[0], alone_long[0, 12:], atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Presets, devices, dtypes

def test_presets_have_documented_sizes():
    sizes = {}
    for name, cfg in M.PRESETS.items():
        with torch.device("meta"):
            sizes[name] = M.Transformer(cfg).num_params() / 1e6
    assert 10 < sizes["cpu-small"] < sizes["cpu-base"] <= 20
    assert 45 < sizes["fastdraft-50m"] < 55 and 140 < sizes["fastdraft-150m"] < 160
    assert M.PRESETS["fastdraft-150m"].rope_scaling["rope_type"] == "llama3"
    m = tiny_model()
    assert m.num_params(non_embedding=True) == m.num_params() - 128 * 64
    assert m.flops_per_token(100) > 6 * m.num_params(non_embedding=True)


def test_device_and_dtype_helpers():
    assert common.pick_device("cpu").type == "cpu"
    assert common.pick_device("auto").type in ("cpu", "cuda", "mps", "hpu")
    with pytest.raises(common.UserError, match="habana"):
        if common.importlib.util.find_spec("habana_frameworks") is not None:
            pytest.skip("Habana bridge installed")
        common.pick_device("hpu")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="cuda"):
            common.pick_device("cuda")
    with pytest.raises(common.UserError):
        common.pick_device("tpu")
    assert common.parse_dtype("auto") is None and common.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(common.UserError):
        common.parse_dtype("int3")
    cpu = torch.device("cpu")
    assert common.train_dtype(torch.device("cuda"), "auto") is torch.bfloat16 and common.train_dtype(cpu, "auto") is None
    assert common.train_dtype(cpu, "float32") is None and common.train_dtype(cpu, "bf16") is torch.bfloat16
    for device, name in ((cpu, "float16"), (torch.device("mps"), "bfloat16")):
        with pytest.raises(common.UserError):
            common.train_dtype(device, name)
    lin, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with common.autocast(cpu, common.train_dtype(cpu, "auto")):      # auto on cpu: full precision
        assert lin(x).dtype == torch.float32
    with common.autocast(cpu, common.train_dtype(cpu, "bfloat16")):  # asked for: bf16 matmuls, fp32 weights
        assert lin(x).dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    assert common.decode_dtype(cpu, "float32") is torch.float32
    assert common.decode_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert common.decode_dtype(cpu, "auto") is (torch.bfloat16 if common.cpu_has_bf16() else torch.float32)
    assert common.has_float64(cpu) and not common.has_float64(torch.device("hpu"))
    assert not common.hpu_lazy() or os.environ.get("PT_HPU_LAZY_MODE") == "1"


def test_load_in_bfloat16(tmp_path):
    checkpoint.save_model(tiny_model(), tmp_path / "d")
    m = checkpoint.load_model(tmp_path / "d", dtype="bfloat16")
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        m.setup_cache(1, 8)
        assert m(ids(T=4, B=1), input_pos=0).dtype == torch.float32


# -----------------------------------------------------------------------------
# A trimmed head and graph-friendly decoding

@pytest.mark.parametrize("tie", [True, False])
def test_trimmed_head_predicts_the_subset_and_round_trips(tmp_path, tie):
    m, x = tiny_model(tie_embeddings=tie, weight_std=0.3), ids(T=10)
    subset = [7, 3, 100, 0, 42]
    with torch.no_grad():
        full = m(x)
        m.trim_head(subset)
        torch.testing.assert_close(m(x), full[..., subset])      # the subset's logits, in the subset's order
    assert m.head_index(torch.tensor([100, 5])).tolist() == [2, -1]
    with torch.no_grad():   # decoding samples from the whole vocabulary: the subset's logits at their ids
        vocab = m.to_vocab(m(x))
    assert m.is_trimmed and vocab.shape == full.shape and torch.equal(vocab[..., subset], m(x))
    assert (vocab.isinf().sum(-1) == 128 - len(subset)).all()
    checkpoint.save_model(m, tmp_path / "d")
    back = checkpoint.load_model(tmp_path / "d")
    assert back.head_ids.tolist() == subset
    with torch.no_grad():
        torch.testing.assert_close(back(x), full[..., subset])
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "d").eval()
        assert hf(x).logits.shape[-1] == 128    # transformers loads it with a full head
    path = tmp_path / "d" / checkpoint.HEAD_VOCAB
    path.write_text(json.dumps({"ids": [7, 3, 100, 0, 41]}))    # another subset of the same size
    with pytest.raises(common.UserError, match="does not match"):
        checkpoint.load_model(tmp_path / "d")
    path.unlink()
    with pytest.raises(common.UserError, match="missing or corrupt"):
        checkpoint.load_model(tmp_path / "d")
    for bad in ([], [1, 1], [128]):
        with pytest.raises(common.UserError):
            tiny_model().trim_head(bad)


@pytest.mark.parametrize("bucket", [16, 64])
def test_bucketed_cache_reads_equal_exact_reads(bucket):
    m, x = tiny_model(weight_std=0.3), ids(T=40, B=1)
    with torch.no_grad():
        full = m(x)
        m.cache_bucket = bucket
        m.setup_cache(1, 100)
        got = [m(x[:, :10], input_pos=0)] + [m(x[:, t:t + 1], input_pos=t) for t in range(10, 30)]
        got.append(m(x[:, 30:], input_pos=30))     # a verify-shaped chunk continuing the cache
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-4, rtol=1e-4)


def test_compiled_decoding_builds_a_bounded_number_of_graphs():
    """A proxy for Gaudi and CUDA graphs: with shapes fixed per (tokens, cache bucket), compiling the layers
    with dynamic shapes off gives one graph per shape, not one per token: a 12-token prompt, 64 one-token steps
    and 4-token verify chunks read the cache in buckets of 64 slots, so at most 5 graphs."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    m, x = tiny_model(weight_std=0.3), ids(T=110, B=1)
    with torch.no_grad():
        full = m(x)
        counter = CompileCounter()
        m.compile_blocks(64, backend=counter, dynamic=False)
        m.setup_cache(1, 128)
        got = [m(x[:, :12], input_pos=0)] + [m(x[:, t:t + 1], input_pos=t) for t in range(12, 76)]
        got += [m(x[:, t:t + 4], input_pos=t) for t in range(76, 108, 4)] + [m(x[:, 108:], input_pos=108)]
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-4, rtol=1e-4)
    # graphs: prompt (12 tokens, 64 slots); one token at 64 and 128 slots; 4 tokens at 128; 2 tokens at 128
    assert counter.frame_count <= 5, counter.frame_count
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# Bad input: one clear line

def test_bad_inputs_raise_user_errors(tmp_path):
    with pytest.raises(common.UserError, match="no such"):
        checkpoint.load_model(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(common.UserError, match="config.json"):
        checkpoint.load_model(tmp_path / "notes")
    (tmp_path / "notes" / "config.json").write_text('{"foo": 1}')
    with pytest.raises(common.UserError, match="neither"):
        checkpoint.load_model(tmp_path / "notes")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(common.UserError, match="LlamaForCausalLM"):
        checkpoint.load_model(tmp_path / "gpt2")
    with pytest.raises(common.UserError, match="neither"):
        checkpoint.load_model(tmp_path / "notes" / "a.txt")


def test_corrupt_files_raise_user_errors(tmp_path):
    checkpoint.save_model(tiny_model(), tmp_path / "d")
    st = tmp_path / "d" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="model.safetensors"):
        checkpoint.load_model(tmp_path / "d")
    st.write_bytes(b"\x00" * 64)
    with pytest.raises(common.UserError, match="model.safetensors"):
        checkpoint.load_model(tmp_path / "d")

    write_gguf(tmp_path / "ok.gguf", tiny_model(), types=[gguf.GGMLQuantizationType.F32])
    data = (tmp_path / "ok.gguf").read_bytes()
    for name, blob in (("cut.gguf", data[: len(data) // 2]), ("head.gguf", data[:40]),
                       ("junk.gguf", b"GGUF" + b"\xff" * 100)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(common.UserError, match=name):
            checkpoint.load_model(tmp_path / name)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(common.UserError, match="gpt2.*supported: llama"):
        checkpoint.load_model(tmp_path / "gpt2.gguf")


def test_run_cli_turns_user_error_into_exit_2(capsys):
    def main():
        raise common.UserError("bad flag")
    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: bad flag"
