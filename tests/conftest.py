"""Shared test setup: offline, CPU, the repo root on sys.path, one thread, and the models and tokenizers that
several test files use (built once per session)."""
import os
import sys
import tempfile

import pytest
import torch

# Without these, datasets and transformers retry the unreachable hub for ~20 s per call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Per-machine measurements (speculative.fastest_dtypes) go to a throwaway folder, never the user's cache.
if "FASTDRAFT_CACHE" not in os.environ:
    _cache = tempfile.TemporaryDirectory(prefix="fastdraft-test-cache-")   # removed when the session ends
    os.environ["FASTDRAFT_CACHE"] = _cache.name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import common  # noqa: E402
import model as M  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Batch-1 decoding is latency-bound: on a small shared machine, two threads spin-waiting for each other
    make every forward many times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
               tie_embeddings=True, weight_std=None, **kw):
    """A small random model. weight_std (e.g. 0.3) redraws every matrix with that scale, so greedy outputs vary
    with the context (with the small default init a random model just repeats its input token); norms are drawn
    away from 1, so a mistaken norm weight shows up."""
    torch.manual_seed(seed)
    cfg = M.ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        ffn_dim=ffn_dim, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings, **kw)
    m = M.Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif weight_std is not None and p.dim() == 2:
                p.normal_(0.0, weight_std)
    return m


@pytest.fixture(scope="session")
def smollm2():
    """The real default target, SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), loaded once."""
    try:
        return checkpoint.load_model("smollm2")
    except common.UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_tok():
    """The target's tokenizer, read from the same GGUF file."""
    import tokenizer
    try:
        return tokenizer.load_tokenizer("smollm2")
    except common.UserError as e:
        pytest.skip(str(e))
