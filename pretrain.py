"""
Stages 1 and 2 of FastDraft (Zafrir et al., "FastDraft: How to Train Your Draft", arXiv 2411.11055): pretrain a
small draft LM with next-token prediction on natural language (PT), then continue pretraining it on a code + prose
mixture (CP). The draft always uses the *target's* tokenizer: speculative decoding compares draft and target
distributions token by token, so the vocabularies must match.

    python pretrain.py                                   # CPU-sized draft for SmolLM2, ~10 min on 2 idle cores
    python pretrain.py --init-from out/pretrain --data "builtin:code=0.67,builtin:prose=0.33" --out out/continued
    torchrun --nproc_per_node 8 pretrain.py --device hpu --preset fastdraft-150m \\
        --target /models/Llama-3.1-8B-Instruct --data fineweb --max-tokens 10e9 --out out/llama-draft
"""
import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import sys

import torch

import data
import synthetic
import tokenizer
from checkpoint import load_model
from common import UserError, check_flags, pick_device, run_args, run_cli, train_dtype, write_json
from model import PRESETS, Transformer
from train import (LoopConfig, compile_default, configure_optimizer, end_run, load_checkpoint, next_token_loss,
                   setup_distributed, summary, train, trim_to_frequent)

HEAD_VOCAB_TOKENS = 1_000_000   # without --head-vocab-from, the subset is counted over this many training tokens
SHAPE_FLAGS = ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "rope_theta"]
# The flags that define a run, and their defaults. On the command line they have none (argparse.SUPPRESS: absent
# unless given), so that --resume tells a flag given now from one left out (common.run_args: the rule).
RUN_DEFAULTS = {"preset": "cpu-small", **dict.fromkeys(SHAPE_FLAGS), "tokenizer": "smollm2", "init_from": None,
                "init_from_target": None, "target_layers": None, "head_vocab": None, "head_vocab_from": None,
                "data": "builtin", "val_data": None, "data_sharding": "documents", "seq_len": 256, "batch_size": 4,
                "grad_accum": 1, "max_tokens": 5e5, "lr": 2e-3, "min_lr": None, "warmup": None,
                "weight_decay": 0.1, "grad_clip": 1.0, "dtype": "auto", "seed": 0, "val_batches": 8}


def make_parser():
    D = RUN_DEFAULTS
    p = argparse.ArgumentParser(
        description="FastDraft stages 1-2: pretrain (or continue pretraining) a draft model in the target's "
                    "vocabulary. One device, or many under torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS,
        epilog="Stage 2 (continued pretraining): --init-from <stage-1 draft> --data \"builtin:code=0.67,"
               "builtin:prose=0.33\". Real-world: torchrun --nproc_per_node 8 pretrain.py --device hpu "
               "--preset fastdraft-150m --target <Llama-3.1-8B folder> --data fineweb --max-tokens 10e9 "
               "--seq-len 2048 --batch-size 8 --grad-accum 4")
    m = p.add_argument_group("draft model")
    m.add_argument("--preset", help=f"size preset from model.py: {', '.join(PRESETS)} (default: {D['preset']})")
    m.add_argument("--dim", type=int, help="hidden size (overrides the preset)")
    m.add_argument("--n-layers", type=int, help="transformer blocks (overrides the preset)")
    m.add_argument("--n-heads", type=int, help="attention heads (overrides the preset)")
    m.add_argument("--n-kv-heads", type=int, help="key/value heads, grouped-query attention (overrides the preset)")
    m.add_argument("--ffn-dim", type=int, help="SwiGLU intermediate size (overrides the preset)")
    m.add_argument("--head-dim", type=int, help="per-head size (default dim / n-heads)")
    m.add_argument("--rope-theta", type=float, help="RoPE base (overrides the preset)")
    m.add_argument("--tokenizer", "--target", dest="tokenizer",
                   help=f"the target whose vocabulary the draft uses: smollm2, a HF folder, a .gguf, a draft folder, "
                        f"tokenizer.json/.model (default: {D['tokenizer']}; with --init-from the draft's own)")
    m.add_argument("--init-from", metavar="DIR",
                   help="start from this draft's weights, fresh optimizer and schedule (continued pretraining)")
    m.add_argument("--init-from-target", metavar="SPEC", help="start from the target's embedding table (and head "
                   "rows), SVD-projected if narrower; the default --tokenizer becomes SPEC")
    m.add_argument("--target-layers", metavar="I,J,...", help="with --init-from-target: also copy these decoder "
                   "layers and the final norm (the draft then has the target's width, heads and ffn)")
    m.add_argument("--head-vocab", type=int, metavar="K", help="the head predicts only the K tokens most frequent in "
                   "--head-vocab-from, or else in the first training rows (at most 1M tokens); special and stop "
                   "tokens always kept. A trimmed --init-from draft keeps its own subset")
    m.add_argument("--head-vocab-from", metavar="DIR[,DIR]",
                   help="`distill.py generate` folders whose completions (the target's text) choose --head-vocab")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="data spec (data.py): builtin, builtin:code, fineweb, hf:NAME..., files/globs, or "
                                  f"a=0.7,b=0.3 (default: {D['data']})")
    d.add_argument("--data-sharding", choices=["rows", "documents"], help="under torchrun: documents = each rank "
                   "reads and tokenizes only its own documents; rows = every rank reads the whole stream and keeps "
                   "its slice of each global batch (N ranks train exactly like one process; N times the "
                   f"tokenizing) (default: {D['data_sharding']})")
    d.add_argument("--val-data", help="held-out data spec (default: the held-out split of --data)")
    d.add_argument("--val-batches", type=int, help=f"batches per validation, 0: none (default: {D['val_batches']})")
    d.add_argument("--seq-len", type=int, help=f"tokens per training row (default: {D['seq_len']})")
    d.add_argument("--batch-size", type=int, help=f"rows per micro-batch per process (default: {D['batch_size']})")
    d.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {D['grad_accum']})")
    d.add_argument("--max-tokens", type=float, help="training budget: steps = it / global batch tokens "
                                                    f"(default: {D['max_tokens']:g})")
    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default: {D['lr']:g})")
    o.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default lr / 10)")
    o.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of the steps, at most 2000)")
    o.add_argument("--weight-decay", type=float,
                   help=f"AdamW weight decay, matrices only (default: {D['weight_decay']})")
    o.add_argument("--grad-clip", type=float, help=f"clip the gradient norm, 0: off (default: {D['grad_clip']})")
    o.add_argument("--dtype", help="autocast dtype: auto (bf16 on cuda/hpu, fp32 on cpu), float32, bfloat16; "
                                   f"weights stay fp32 (default: {D['dtype']})")
    o.add_argument("--seed", type=int, help=f"model init and data order (default: {D['seed']})")
    r = p.add_argument_group("run (these may change on --resume)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (hpu_backend on Gaudi); None: on for cuda and Gaudi's "
                        "eager mode, off on cpu and mps")
    r.add_argument("--out", default=None, help="checkpoint folder; None: DIR of --resume, out/continued with "
                                               "--init-from, else out/pretrain")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR exactly where it "
                                                                 "stopped (its flags are the checkpoint's)")
    r.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0: only at start and end)")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    r.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save and stop after STEP, on the full run's schedule")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or hpu")
    r.add_argument("--json", default=None, metavar="PATH", help="write the final numbers as one JSON object")
    return p


def parse_args(argv):
    """The flags of this run: given, else the resumed checkpoint's, else the defaults. Returns (args, given, meta)."""
    args = make_parser().parse_args(argv)
    meta = load_checkpoint(args.resume) if args.resume else {}
    # extending (or shortening) the budget of a resumed run is allowed; the cosine schedule follows it
    given = run_args(args, RUN_DEFAULTS, meta.get("args"), may_change=["max_tokens"])
    return args, given, meta


def check_args(args):
    """Reject impossible values with one line (exit 2)."""
    check_flags(args, positive=["seq_len", "batch_size", "grad_accum", "max_tokens", "log_every", "lr", "head_vocab",
                                *SHAPE_FLAGS],
                non_negative=["min_lr", "warmup", "weight_decay", "grad_clip", "eval_every", "save_every", "stop_at",
                              "val_batches"])
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from: {', '.join(PRESETS)})")
    if args.target_layers and not args.init_from_target:
        raise UserError("--target-layers copies layers of the target: give --init-from-target SPEC too")
    if args.init_from_target and args.init_from:
        raise UserError("--init-from and --init-from-target exclude each other (one starting point)")
    if args.head_vocab_from and not args.head_vocab:
        raise UserError("--head-vocab-from chooses the tokens of --head-vocab K: give K too")


# -----------------------------------------------------------------------------------------------------------
# Setup: the draft and its data

def build_draft(args, tok, given, device):
    """A fresh draft from --preset + shape flags (or the target's shape with --target-layers), started from the
    target's weights with --init-from-target; or the --init-from draft. Vocabulary from the tokenizer."""
    if args.init_from:
        if given & {"preset", *SHAPE_FLAGS}:
            raise UserError("--preset and shape flags do not apply with --init-from (its shape is in its config)")
        draft = load_model(args.init_from, device=device, dtype=torch.float32)
        tokenizer.check_same_vocab(tok, vocab_size=draft.config.vocab_size, what="the --init-from draft")
        if draft.config.tokenizer and draft.config.tokenizer != tok.spec:
            theirs = tokenizer.load_tokenizer(draft.config.tokenizer)
            tokenizer.check_same_vocab(tok, theirs, what="the --init-from draft")
        if args.seq_len > draft.config.max_seq_len:
            raise UserError(f"--seq-len {args.seq_len} exceeds the draft's context ({draft.config.max_seq_len})")
        draft.config.tokenizer = draft.config.tokenizer or tok.spec
        return draft
    shape = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    base, target, layers = PRESETS[args.preset], None, []
    if args.init_from_target:
        target = load_model(args.init_from_target, device=device)   # its own dtype: copy_() casts to the draft's
        tokenizer.check_same_vocab(tok, vocab_size=target.config.vocab_size, what=args.init_from_target)
    if args.target_layers:   # a layer-pruned copy: the target's shape (and RoPE, norm eps, tying), fewer layers
        layers = parse_layers(args.target_layers, target.config.n_layers)
        base = dataclasses.replace(target.config, n_layers=len(layers))
        for k, v in shape.items():
            if getattr(base, k) != v:
                raise UserError(f"--target-layers copies the target's layers: --{k.replace('_', '-')} must be "
                                f"{getattr(base, k)} (or left out)")
    config = dataclasses.replace(base, **shape, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 tokenizer=tok.spec, max_seq_len=max(base.max_seq_len, args.seq_len))
    config.eos_ids = sorted(set(tok.stop_ids) - {tok.eos_id})   # extra stop ids besides the primary eos
    torch.manual_seed(args.seed)    # every rank builds the same initial weights
    draft = Transformer(config).to(device)
    if target is not None:
        init_from_target(draft, target, layers)
    return draft


def parse_layers(text, n_layers):
    """--target-layers "0,1,5" -> [0, 1, 5], each a layer of the target."""
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--target-layers takes a comma list of layer numbers, got {text!r}")
    if not layers or not all(0 <= i < n_layers for i in layers):
        raise UserError(f"--target-layers {text}: the target has layers 0..{n_layers - 1}")
    return layers


@torch.no_grad()
def init_from_target(draft, target, layers=()):
    """The draft starts from the target (FastDraft trains from scratch; this is an option to measure): its
    embedding table and head rows, and with `layers` those decoder layers and the final norm. A narrower draft
    (width d < D) gets the table projected onto its d leading right-singular vectors: with E = U S V^T,
    E @ V_d = U_d S_d is the best rank-d approximation of E (Eckart-Young) in d coordinates, so the directions that
    tell the target's tokens apart most are kept. Plain SVD, not PCA: the table is not centred, since a tied
    head's logits use the mean direction too. An untied draft head gets the target's head rows the same way."""
    E = target.embed_tokens.weight.float()                                    # (V, D)
    H = E if target.lm_head is None else target.lm_head.weight.float()        # (V, D) the target's head rows
    if draft.config.dim != E.shape[1]:
        basis = torch.linalg.svd(E, full_matrices=False).Vh[:draft.config.dim].T   # (D, d)
        E, H = E @ basis, H @ basis                                           # (V, d)
    draft.embed_tokens.weight.copy_(E)
    if draft.lm_head is not None:
        draft.lm_head.weight.copy_(H)
    for i, j in enumerate(layers):
        draft.layers[i].load_state_dict(target.layers[j].state_dict())
    if layers:
        draft.norm.load_state_dict(target.norm.state_dict())


def head_vocab_text(args, tok):
    """The token lists a --head-vocab subset is counted over: the target's completions in the --head-vocab-from
    folders, or else the first rows this run trains on (at most HEAD_VOCAB_TOKENS tokens)."""
    if args.head_vocab_from:
        synthetic.check_data_vocab(args.head_vocab_from, tok)
        return [c for _, c in synthetic.read_synthetic(args.head_vocab_from, tok.vocab_size)]
    rows = data.iterate_batches(args.data, tok, args.seq_len, args.batch_size, seed=args.seed)
    n = max(1, min(HEAD_VOCAB_TOKENS, int(args.max_tokens)) // (args.seq_len * args.batch_size))
    return [row.tolist() for x, _ in itertools.islice(rows, n) for row in x]


def load_resumed(folder, tok, device):
    """The draft of the run being resumed (load_model says in one line what is wrong with a corrupt one)."""
    draft = load_model(folder, device=device, dtype=torch.float32)
    tokenizer.check_same_vocab(tok, vocab_size=draft.config.vocab_size, what=f"checkpoint {folder}")
    return draft


class RankRows:
    """--data-sharding rows: this rank's rows [rank*B, (rank+1)*B) of a global batch of world*B rows that every rank
    reads, so N processes x B rows train on exactly the rows one process with N*B rows would (equal losses). The
    price: every rank tokenizes the whole stream, N times the work of --data-sharding documents."""

    def __init__(self, batches, rank, batch_size):
        self.batches, self.lo, self.hi = batches, rank * batch_size, (rank + 1) * batch_size

    def __iter__(self):
        return self

    def __next__(self):
        return tuple(t[self.lo:self.hi] for t in next(self.batches))   # (world*B, T) -> (B, T)

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)


def make_batches(args, tok, dist, device):
    """Training batches for this rank (see --data-sharding) and rank 0's validation batches."""
    if args.data_sharding == "rows":
        batches = data.iterate_batches(args.data, tok, args.seq_len, args.batch_size * dist.world, seed=args.seed)
        batches = RankRows(batches, dist.rank, args.batch_size)
    else:   # each rank its own documents (data.py's sharding): no shared stream
        batches = data.iterate_batches(args.data, tok, args.seq_len, args.batch_size, seed=args.seed,
                                       rank=dist.rank, world_size=dist.world, device=device)
    val_batches = None
    if dist.rank == 0 and args.val_batches:
        val_batches = data.validation_batches(args.val_data or args.data, tok, args.seq_len, args.batch_size,
                                              args.val_batches, device=device)
    return batches, val_batches


def replicas_identical(draft, ddp):
    """True when every rank holds bit-identical weights (DDP keeps replicas in step; this checks it)."""
    if not ddp:
        return True
    digest = hashlib.sha256()
    for p in draft.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def next_commands(out, args):
    """What to run after this stage (FastDraft: PT -> CP -> FT)."""
    generate = f"python distill.py generate --target {args.tokenizer} --prompts magpie:96,code:builtin:code:96 " \
               f"--out out/synthetic"
    if not args.init_from:
        return [f"python pretrain.py --init-from {out} --data \"builtin:code=0.67,builtin:prose=0.33\" "
                f"--out out/continued", generate]
    return [generate, f"python distill.py train --draft {out} --target {args.tokenizer} --data out/synthetic "
                      f"--out out/aligned"]


def report_run(args, report, draft, world, in_step, tokens_per_step):
    """Rank 0's last words: the numbers (--json), the validation curve, and how to resume or what to run next."""
    if not in_step:
        print("warning: the ranks ended with different weights (a DDP bug or non-deterministic kernels)")
    result = {"out": args.out, **summary(report), "params": draft.num_params(), "tokens": report["tokens"],
              "world_size": world, "replicas_identical": in_step, "global_batch_tokens": tokens_per_step,
              "first_step": report["first_step"], "train_seconds": round(report["train_seconds"], 2),
              "head_vocab": None if draft.head_ids is None else len(draft.head_ids)}
    vals = report["val_history"]
    if vals:
        result["val_ppl_end"] = math.exp(min(vals[-1][1], 50))
        print(f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]}), "
              f"perplexity {result['val_ppl_end']:.1f}; {report['tokens_per_second']:,.0f} tokens/s")
    if args.json:
        write_json(args.json, result)
    resume = f"continue with: python pretrain.py --resume {args.out}"
    if report["stopped"] == "signal":
        print(f"stopped by signal {report['signal']} after step {report['step']}; checkpoint in {args.out}\n{resume}")
    elif report["stopped"] == "stop_at":
        print(f"stopped at step {report['step']} (--stop-at); {resume}")
    else:
        print(f"draft saved to {args.out}/ (config.json + model.safetensors: loads in transformers too)\nnext:")
        for cmd in next_commands(args.out, args):
            print(f"  {cmd}")


# -----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args, given, meta = parse_args(sys.argv[1:] if argv is None else argv)
    if args.resume and given & {"init_from", "init_from_target"}:
        raise UserError("--resume and --init-from exclude each other (resume continues a run; init-from starts one)")
    check_args(args)
    if args.init_from_target and "tokenizer" not in given and not args.resume:
        args.tokenizer = args.init_from_target
    elif args.init_from and "tokenizer" not in given and not args.resume:   # the draft's own tokenizer
        path = os.path.join(args.init_from, "config.json")
        if os.path.isfile(path):
            args.tokenizer = json.load(open(path)).get("fastdraft", {}).get("tokenizer") or args.tokenizer
    args.out = args.out or args.resume or ("out/continued" if args.init_from else "out/pretrain")

    device, dist = setup_distributed(pick_device(args.device))
    compile = compile_default(args.compile, device)
    say = dist.say
    dtype = train_dtype(device, args.dtype)
    if not args.resume and os.path.isfile(os.path.join(args.out, "train_state.pt")):
        say(f"note: {args.out} holds a checkpoint; this new run replaces it at its first save "
            f"(--resume {args.out} would continue it)")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = tokenizer.load_tokenizer(args.tokenizer)
    draft = load_resumed(args.resume, tok, device) if args.resume else build_draft(args, tok, given, device)
    if args.head_vocab and not args.resume:
        covered = trim_to_frequent(draft, args.head_vocab, tok, head_vocab_text(args, tok), say)
        say(f"head: {len(draft.head_ids)} tokens, {covered:.1%} of the tokens they were counted over")
    head = None if draft.head_ids is None else len(draft.head_ids)
    draft.train()
    optimizer = configure_optimizer(draft, args.lr, args.weight_decay, device=device)
    batches, val_batches = make_batches(args, tok, dist, device)
    start_step = load_checkpoint(args.resume, optimizer, batches, dist)["step"] if args.resume else 0
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * dist.world
    max_steps = max(1, int(args.max_tokens) // tokens_per_step)
    cfg = LoopConfig(max_steps=max_steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                     grad_accum=args.grad_accum, grad_clip=args.grad_clip, dtype=dtype, eval_every=args.eval_every,
                     save_every=args.save_every, log_every=args.log_every, out=args.out, start_step=start_step,
                     stop_at=args.stop_at, compile=compile, seq_len=args.seq_len)
    say(f"draft: {draft.num_params() / 1e6:.2f}M parameters ({draft.num_params(non_embedding=True) / 1e6:.2f}M "
        f"without embeddings), vocab {tok.vocab_size} from {tok.spec!r}{f' (head: {head})' if head else ''}, on "
        f"{device}{' (' + str(dtype).replace('torch.', '') + ' autocast)' if dtype else ''}")
    say(f"global batch: {args.batch_size} rows x {args.seq_len} tokens x {args.grad_accum} accum x {dist.world} "
        f"process{'es' if dist.world > 1 else ''} = {tokens_per_step:,} tokens/step; {max_steps} steps for "
        f"{max_steps * tokens_per_step:,} tokens" + (f"; resuming at step {start_step}" if start_step else ""))

    report = train(draft, optimizer, batches, cfg, device=device, loss_fn=next_token_loss, val_batches=val_batches,
                   dist=dist, log=say, extra={"args": vars(args), "val_history": meta.get("val_history", [])})
    in_step = replicas_identical(draft, dist.ddp)
    if dist.rank == 0:
        report_run(args, report, draft, dist.world, in_step, tokens_per_step)
    end_run(report, dist)


if __name__ == "__main__":
    run_cli(main)
