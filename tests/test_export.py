"""Export to the runtimes: GGUF and HF folders read back with the same logits, the target's tokenizer metadata, a
trimmed head whose subset logits survive, and the fitted row that keeps the other tokens' mass near zero."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import checkpoint
import export
import model as M
from common import UserError
from conftest import ROOT, tiny_model

SHIPPED = os.path.join(ROOT, "drafts", "smollm2-135m")


def logits(m, x):
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_is_exact_up_to_the_weights_rounding(tmp_path, tied):
    m = tiny_model(weight_std=0.3, vocab_size=96, tie_embeddings=tied, rope_scaling=dict(M.LLAMA3_ROPE, factor=4.0))
    x = torch.randint(0, 96, (2, 17))
    for kind, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        checkpoint.save_gguf(m, tmp_path / "m.gguf", [], kind)
        back = checkpoint.load_model(tmp_path / "m.gguf")
        assert back.config.rope_scaling["factor"] == 4.0 and back.config.tie_embeddings == tied
        rounded = tiny_model(weight_std=0.3, vocab_size=96, tie_embeddings=tied, rope_scaling=m.config.rope_scaling)
        with torch.no_grad():  # the matrices rounded to the file's type, the norms kept in f32 as llama.cpp has them
            for p in rounded.parameters():
                p.copy_(p.to(dtype).float() if p.dim() == 2 else p)
        if kind == "f32":
            assert torch.equal(logits(back, x), logits(m, x))
        assert torch.allclose(logits(back, x), logits(rounded, x), atol=1e-5, rtol=0), kind
        if kind != "f32":
            assert not torch.equal(logits(back, x), logits(m, x))  # the rounding did happen
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_gguf_carries_the_targets_tokenizer_token_for_token(tmp_path, smollm2_tok):
    import tokenizer
    source = checkpoint.resolve_spec("smollm2")
    fields = checkpoint.gguf_tokenizer_fields(source)
    m = tiny_model(vocab_size=smollm2_tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    checkpoint.save_gguf(m, tmp_path / "d.gguf", fields, "f16")
    keys = [k for k, *_ in fields]
    assert "tokenizer.ggml.tokens" in keys and "tokenizer.ggml.merges" in keys
    assert checkpoint.gguf_metadata(tmp_path / "d.gguf", keys) == checkpoint.gguf_metadata(source, keys)
    assert tokenizer.load_tokenizer(str(tmp_path / "d.gguf")).fingerprint() == smollm2_tok.fingerprint()


@pytest.mark.parametrize("tied", [True, False])
def test_exported_head_keeps_the_trimmed_heads_subset_logits(tmp_path, tied):
    m = tiny_model(weight_std=0.3, vocab_size=96, tie_embeddings=tied)
    ids = torch.randperm(96)[:40]
    m.trim_head(ids)
    fill = torch.randn(m.config.dim)
    full = checkpoint.full_head(m, fill)
    x = torch.randint(0, 96, (1, 12))
    checkpoint.save_gguf(full, tmp_path / "d.gguf", [], "f32")
    checkpoint.save_model(full, tmp_path / "hf")
    for path in (tmp_path / "d.gguf", tmp_path / "hf"):
        out = logits(checkpoint.load_model(path), x)
        assert torch.equal(out[..., ids], logits(m, x))
        rest = torch.ones(96, dtype=torch.bool)
        rest[ids] = False
        assert torch.allclose(out[..., rest], (m.hidden(x) @ fill).unsqueeze(-1).expand_as(out[..., rest]).detach(),
                              atol=1e-5)


def test_export_command_writes_what_transformers_loads(tmp_path, smollm2_tok):
    transformers = pytest.importorskip("transformers")
    m = tiny_model(weight_std=0.3, vocab_size=smollm2_tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                   ffn_dim=32, tokenizer="smollm2", bos_id=1, eos_id=2)
    m.trim_head(list(range(512)))
    checkpoint.save_model(m, tmp_path / "draft")
    (tmp_path / "fit").mkdir()
    for i in range(30):  # files, not one: data.py holds ~2% of documents out, by a hash of their names
        (tmp_path / "fit" / f"f{i}.py").write_text("\n".join(f"def f{j}(x):\n    return x * {i} + {j}  # sum"
                                                            for j in range(12)))
    export.main(["--draft", str(tmp_path / "draft"), "--out", str(tmp_path / "out"), "--fit-tokens", "2000",
                 "--fit-data", str(tmp_path / "fit"),
                 "--gguf-type", "f32", "--keep-fill", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head"]["fitted"]["outside_mass"] < report["head"]["zeros"]["outside_mass"]
    assert checkpoint.read_head_fill(tmp_path / "draft") is not None  # --keep-fill stored it for its weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "draft-hf").eval()
    x = torch.tensor([smollm2_tok.encode("def add(a, b):\n    return a + b")])
    with torch.no_grad():
        theirs = hf(x).logits
    ours = logits(checkpoint.load_model(tmp_path / "out" / "draft.gguf"), x)
    assert torch.allclose(theirs, ours, atol=1e-4)
    assert torch.allclose(theirs[..., :512], logits(m, x), atol=1e-4)


def test_shipped_drafts_stored_fill_keeps_the_outside_mass_near_zero(smollm2_tok):
    fill = checkpoint.read_head_fill(SHIPPED)
    assert fill is not None, "head_fill.json is missing or was fitted for other weights: run export.py --keep-fill"
    d = checkpoint.load_model(SHIPPED, dtype=torch.float32)
    text = "<|im_start|>user\nWhy is the sea salty?<|im_end|>\n<|im_start|>assistant\nThe sea is salty because " \
           "rivers carry minerals from rocks into it, and when water evaporates the salt stays behind.\n"
    h = export.final_hidden(d, [smollm2_tok.encode(text)])
    zeros = export.head_report(d, checkpoint.full_head(d, torch.zeros(d.config.dim)).lm_head.weight, h)
    fitted = export.head_report(d, checkpoint.full_head(d, torch.tensor(fill)).lm_head.weight, h)
    assert zeros["outside_mass"] > 0.3 and fitted["outside_mass"] < 0.01
    assert fitted["argmax_agreement"] >= 0.95


def test_bad_input_is_one_line_and_leaves_no_file(tmp_path):
    m = tiny_model(vocab_size=96, tokenizer="smollm2")
    checkpoint.save_model(m, tmp_path / "small")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--draft", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error:"), run.stderr
    for argv in (["--draft", str(tmp_path / "small")], ["--model", str(tmp_path / "small"), "--formats", "gif"]):
        with pytest.raises(UserError):
            export.main([*argv, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_llama_cpp_peer_reads_the_runtimes_counts(tmp_path):
    import peers
    assert peers.llama_cpp_binaries(str(tmp_path)) is None  # no llama.cpp there: the peer is skipped
    logs = {"llama-speculative-simple": "I encoded 6 tokens in 0.1 seconds\nI decoded   66 tokens in    2.877 seconds, "
                                 "speed: 22.9 t/s\nI n_drafted = 84\nI n_accept  = 37\n",
            "llama-completion": "prompt eval time = 80.00 ms / 6 tokens\n       eval time =  1000.00 ms /    20 runs"}
    for name, log in logs.items():
        (tmp_path / name).write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{log}\nEOF\n")
        (tmp_path / name).chmod(stat.S_IRWXU)
    spec, plain = peers.llama_cpp_binaries(str(tmp_path))
    args = type("A", (), {"max_new_tokens": 64})()
    assert peers.run_llama_cpp(spec, ["t", "d"], "x", args, 3, 0.3) == \
        {"new_tokens": 66, "seconds": 2.877, "drafted": 84, "accepted": 37}
    assert peers.run_llama_cpp(plain, ["t", "d"], "x", args) == {"new_tokens": 20, "seconds": 1.0}
