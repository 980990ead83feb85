"""
Stage 3 of FastDraft: align the draft to its target (Zafrir et al., ACL 2025, arXiv 2411.11055, "FT").

    python distill.py generate --target smollm2 --prompts magpie:200,code:builtin:code:200 --out data/synth
    python distill.py train --draft out/cp --target smollm2 --data data/synth --out out/ft
    python distill.py train --draft out/ft --target smollm2 --on-policy magpie:640,code:builtin:code:900 --loss tvd \
        --out out/op
    python distill.py trim --draft out/ft --head-vocab 8192 --data data/synth --out out/ft-8k

`generate`: the target answers every prompt at several temperatures and greedily, and writes instructions itself
(Magpie); generation.py holds how, synthetic.py the prompt sources and the folder format. `train`: fine-tune the
draft on prompt + completion, loss on the completion only. `--loss ce` (the default) is sequence-level knowledge
distillation (Kim & Rush 2016); kl, tvd, ce+kl, ce+tvd are the token-level variants the paper compares, against
the target's distribution: computed on the fly, or read from the top-k `generate --store-top-k K` kept while the
target wrote the data (no second target pass). `train --on-policy SOURCES`: the draft writes its own continuations
of the prompts (generation.OnPolicyBatches) and learns, with a token-level loss, the target's distribution at
every position of them (on-policy distillation). The loop and the rest are train.py's.
`trim`: the draft's head keeps only the K tokens the target writes most (VocabTrim): a cheaper draft step.
"""

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import synthetic
import tokenizer
from checkpoint import load_model, save_model
from common import UserError, check_flags, decode_dtype, pick_device, run_args, run_cli, train_dtype, write_json
from generation import OnPolicyBatches, generate_dataset, rollout_prompts
from train import (IGNORE, LoopConfig, autocast_off, compile_default, configure_optimizer, end_run, head_targets,
                   load_checkpoint, next_token_loss, setup_distributed, summary, train, trim_to_frequent)

LOSSES = ("ce", "kl", "tvd", "ce+kl", "ce+tvd")
# `train`'s flags that define a run, and their defaults; on --resume they come from the checkpoint
TRAIN_DEFAULTS = {"draft": None, "target": None, "data": None, "loss": "ce", "kd_temperature": 1.0, "top_k": None,
                  "kd_weight": 1.0, "head_vocab": None, "seq_len": None, "batch_size": 8, "grad_accum": 1,
                  "epochs": 1.0, "max_steps": None, "lr": 3e-4, "min_lr": None, "warmup": None, "weight_decay": 0.1,
                  "grad_clip": 1.0, "val_fraction": 0.05, "val_batches": 8, "dtype": "auto", "seed": 0,
                  "on_policy": None, "rollout_tokens": 128, "rollout_temperatures": "0.6,0", "teacher": "auto"}


# -----------------------------------------------------------------------------
# the losses: sequence-level KD (cross-entropy on the target's text) and the token-level variants

def distill_loss(draft_logits, y, target_logits=None, loss="ce", kd_temperature=1.0, top_k=None, kd_weight=1.0,
                 scored=None):
    """The training loss at the completion positions. draft_logits, target_logits (N, V); y (N,) target tokens,
    IGNORE where no cross-entropy is scored; scored (N,) bool, where the token-level part is (default y != IGNORE).
    p is the target's distribution softened by the KD temperature, optionally truncated to its top-k tokens and
    renormalised (the paper's "sparse top-k target logits": k logits a token instead of V).
    ce:  cross-entropy on the target's sampled text = sequence-level KD (Kim & Rush 2016), the paper's default.
    kl:  forward KL(p || q) per token, times T^2 so gradients keep their size across temperatures (Hinton 2015).
    tvd: total variation 0.5 * sum |p - q|; 1 - TVD is exactly the per-token acceptance probability of
         speculative sampling (Leviathan et al. 2023, Theorem 3.5), so it is the quantity decoding cares about.
    ce+kl, ce+tvd: the sum, the KD part weighted by kd_weight.
    Returns (loss, {"ce": .., "kd": ..}) with the parts detached for logging. Every shape is fixed by N: masked
    means, not boolean indexing, which on Gaudi would make each batch a new graph."""
    ce = F.cross_entropy(draft_logits.float(), y, ignore_index=IGNORE)
    if loss == "ce":
        return ce, {"ce": ce.detach()}
    z = target_logits.float() / kd_temperature                                          # (N, V)
    if top_k is not None and top_k < z.size(-1):
        vals, ix = z.topk(top_k, dim=-1)                                                # (N, k)
        p = torch.zeros_like(z).scatter_(-1, ix, F.softmax(vals, dim=-1))              # (N, V)
    else:
        p = F.softmax(z, dim=-1)                                                        # (N, V)
    log_q = F.log_softmax(draft_logits.float() / kd_temperature, dim=-1)                # (N, V)
    if loss.endswith("kl"):
        # p log(p / q) with 0 log 0 = 0: truncated targets put exact zeros on most of the vocabulary
        logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
        per_token = torch.where(p > 0, p * (logp - log_q), torch.zeros_like(p)).sum(-1) * kd_temperature ** 2
    else:
        per_token = 0.5 * (p - log_q.exp()).abs().sum(-1)                              # (N,)
    scored = (y != IGNORE) if scored is None else scored
    kd = (per_token * scored).sum() / scored.sum().clamp(min=1)
    total = kd if loss in ("kl", "tvd") else ce + kd_weight * kd
    return total, {"ce": ce.detach(), "kd": kd.detach()}


def make_loss_fn(target, loss="ce", kd_temperature=1.0, top_k=None, kd_weight=1.0):
    """loss_fn(draft, x, y) -> scalar, as train.train() runs it (inside the DDP-wrapped module). ce is train.py's
    next-token loss, the prompt positions ignored. The token-level losses score every position of both models and
    mask the prompt and the padding: a fixed shape for Gaudi's graphs, at the memory of (B, T, V) logits for each
    model (lower --batch-size for kl and tvd at a large vocabulary). A trimmed draft (K tokens) is compared with the
    target's distribution restricted to those K tokens and renormalised: that is what the draft can express, and a
    q equal to it maximises acceptance sum_i min(p_i, q_i) over drafts zero elsewhere."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r} (choose {', '.join(LOSSES)})")
    if loss == "ce":
        return next_token_loss
    if target is None:
        return stored_loss_fn(loss, kd_temperature, top_k, kd_weight)

    def loss_fn(draft, x, y):
        logits = draft(x).flatten(0, 1)                                                 # (B*T, K)
        with torch.no_grad():   # the target is a fixed teacher: eval mode, no graph
            target_logits = target(x).flatten(0, 1)                                    # (B*T, V)
        if draft.head_ids is not None:
            target_logits = target_logits[:, draft.head_ids]                            # (B*T, K)
        with autocast_off(x.device):
            return distill_loss(logits, head_targets(draft, y).flatten(), target_logits, loss, kd_temperature, top_k,
                                kd_weight, scored=(y != IGNORE).flatten())[0]
    return loss_fn


def stored_loss_fn(loss, kd_temperature=1.0, top_k=None, kd_weight=1.0):
    """The token-level losses against the target's top-k stored by `generate --store-top-k` (batches of
    x, y, top_ids, top_logprobs): no target pass at all. The k stored log-probs become logits over the draft's
    outputs, -inf elsewhere, so the softmax in distill_loss renormalises them: the paper's sparse top-k KD. A
    trimmed draft keeps the stored tokens its head has; a position with none of them is not scored."""
    def loss_fn(draft, x, y, top_ids, top_logprobs):
        logits = draft(x).flatten(0, 1)                                                 # (B*T, K)
        with autocast_off(x.device):
            pos = draft.head_index(top_ids).flatten(0, 1)                               # (B*T, k); -1 off the head
            vals = torch.where(pos >= 0, top_logprobs.flatten(0, 1).float(), float("-inf"))
            z = logits.new_full(logits.shape, float("-inf")).scatter_reduce(-1, pos.clamp(min=0), vals, "amax")
            seen = torch.isfinite(z).any(-1)                                            # (B*T,)
            z = torch.where(seen[:, None], z, torch.zeros_like(z))                      # no NaN where unscored
            scored = (y != IGNORE).flatten() & seen
            return distill_loss(logits, head_targets(draft, y).flatten(), z, loss, kd_temperature, top_k, kd_weight,
                                scored=scored)[0]
    return loss_fn


# -----------------------------------------------------------------------------
# command line

def make_parser():
    p = argparse.ArgumentParser(description="FastDraft stage 3: the target writes a synthetic data set "
                                            "(generate), the draft is fine-tuned on it (train) or trimmed (trim).")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    head_help = ("the draft's head predicts only the K tokens most frequent in the data's completions (the "
                 "target's text; special and stop tokens always kept): a cheaper draft step")

    g = sub.add_parser("generate", formatter_class=fmt, help="the target answers prompts: a JSONL data set",
                       description="The target answers every prompt at every temperature. Resumable (rerun the "
                                   "same command); under torchrun each rank writes its own share.")
    g.add_argument("--target", default="smollm2", help="the model the draft learns from: smollm2, a HF folder, a .gguf")
    g.add_argument("--prompts", required=True,
                   help="comma-joined sources: magpie:N (the target writes N instructions), FILE.jsonl (--field), "
                        "FILE.txt (one a line), hf:NAME[:CONFIG][:SPLIT][:FIELD], code:SOURCE[:N] (def line + "
                        "docstring from a data.py source, e.g. code:builtin:code:500), text:SOURCE[:N] (a passage's "
                        "100-200 token opening, continued as raw text like bench.py's text task)")
    g.add_argument("--out", required=True, help="output folder (shard-*.jsonl + manifest.json)")
    g.add_argument("--field", default="instruction", help="JSON field holding the instruction (or 'prompt')")
    g.add_argument("--limit", type=int, default=0, help="at most this many prompts per source (0: all)")
    g.add_argument("--temperatures", default="0.6,0.8,1.0,0", help="each prompt is answered at each (0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling for the answers (default: off)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap")
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    g.add_argument("--magpie-max-tokens", type=int, default=128, help="instruction length cap for magpie:N")
    g.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (one work unit)")
    g.add_argument("--store-top-k", type=int, default=0, metavar="K",
                   help="also store the target's K most likely tokens and log-probabilities at every completion "
                        "token, so train's token-level losses need no target (0: off)")

    # The flags that define a training run have no argparse default (SUPPRESS: absent unless given), so that
    # --resume tells a flag given now from one left out (common.run_args); their defaults are TRAIN_DEFAULTS.
    D = TRAIN_DEFAULTS
    t = sub.add_parser("train", formatter_class=fmt, argument_default=argparse.SUPPRESS,
                       help="fine-tune the draft on a generated data set",
                       description="Fine-tune the draft on prompt + completion, loss on the completion only. "
                                   "Same devices, DDP (torchrun), checkpoints and --resume as pretrain.py.")
    t.add_argument("--draft", help="the draft folder to start from (pretrain.py's output)")
    t.add_argument("--target", help="the target (default: the data's manifest's); loaded only for the token-level "
                                    "losses, its tokenizer always checks the vocabulary")
    t.add_argument("--data", help="folder written by `distill.py generate`, or several: DIR1,DIR2")
    t.add_argument("--loss", help=f"one of {', '.join(LOSSES)}; ce = sequence-level KD (default: {D['loss']})")
    t.add_argument("--kd-temperature", type=float, help=f"softens both distributions in kl/tvd (default: "
                                                        f"{D['kd_temperature']})")
    t.add_argument("--top-k", type=int, help="keep the target's top-k tokens, renormalised (kl/tvd; default: all)")
    t.add_argument("--on-policy", metavar="SOURCES",
                   help="on-policy distillation: train on the draft's own continuations of these prompts (generate's "
                        "--prompts syntax, e.g. magpie:640,code:builtin:code:900), scored by the target with --loss "
                        "(kl, tvd, ...); --data then only gives the validation rows")
    t.add_argument("--rollout-tokens", type=int, help=f"on-policy: new tokens the draft writes a prompt (default: "
                                                      f"{D['rollout_tokens']})")
    t.add_argument("--rollout-temperatures", help=f"on-policy: the draft samples batch n at the n-th of these, in turn "
                                                  f"(0 = greedy; default: {D['rollout_temperatures']})")
    t.add_argument("--teacher", choices=["auto", "stored", "live"],
                   help="where kl/tvd read the target's distribution: stored = the top-k `generate --store-top-k` "
                        "kept (no target pass), live = the target run on every batch; auto: stored when every row "
                        f"of --data has it (default: {D['teacher']})")
    t.add_argument("--kd-weight", type=float, help=f"weight of the token-level part in ce+kl, ce+tvd (default: "
                                                   f"{D['kd_weight']})")
    t.add_argument("--head-vocab", type=int, metavar="K", help=head_help + " (a trimmed --draft keeps its own)")
    t.add_argument("--seq-len", type=int, help="rows are cut to this (default: the draft's context, <= 1024)")
    t.add_argument("--batch-size", type=int, help=f"rows per micro-batch per process (default: {D['batch_size']})")
    t.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {D['grad_accum']})")
    t.add_argument("--epochs", type=float, help=f"passes over the data, sets the step count (default: "
                                                f"{D['epochs']})")
    t.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default: {D['lr']:g})")
    t.add_argument("--min-lr", type=float, help="end of the cosine decay (default lr / 10)")
    t.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of the steps, at most 2000)")
    t.add_argument("--weight-decay", type=float, help=f"AdamW weight decay, matrices only (default: "
                                                      f"{D['weight_decay']})")
    t.add_argument("--grad-clip", type=float, help=f"clip the gradient norm, 0: off (default: {D['grad_clip']})")
    t.add_argument("--val-fraction", type=float, help=f"share of prompts held out for validation (default: "
                                                      f"{D['val_fraction']})")
    t.add_argument("--val-batches", type=int, help=f"batches per validation (default: {D['val_batches']})")
    t.add_argument("--dtype", help="autocast dtype: auto (bf16 on cuda/hpu, fp32 on cpu), float32, bfloat16 (cpu "
                                   f"too); the draft's weights stay fp32 (default: {D['dtype']})")
    t.add_argument("--seed", type=int, help=f"data order (default: {D['seed']})")
    t.add_argument("--out", default=None, help="checkpoint / final draft folder; None: DIR of --resume, else "
                                               "out/aligned")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR exactly where it stopped (its flags are the checkpoint's)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step; None: on for cuda and Gaudi's eager mode, off elsewhere")
    t.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0: only start and end)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save and stop after this step (resume later)")
    for s in (g, t):
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or hpu")
        s.add_argument("--json", default=None, metavar="PATH", help="write the final numbers as one JSON object")
    g.add_argument("--dtype", default="auto", help="the target's weights: auto (bf16 on cuda/hpu and on CPUs with "
                                                   "bf16 matrix units, else fp32), float32, bfloat16")
    g.add_argument("--seed", type=int, default=0, help="sampling seeds")

    r = sub.add_parser("trim", formatter_class=fmt, help="trim an existing draft's head to K tokens",
                       description="The draft's head keeps the K tokens most frequent in the target's completions.")
    r.add_argument("--draft", required=True, help="the draft folder to trim")
    r.add_argument("--head-vocab", type=int, required=True, metavar="K", help=head_help)
    r.add_argument("--data", required=True, help="folder(s) written by `distill.py generate`: DIR1,DIR2")
    r.add_argument("--target", help="its tokenizer names the special tokens (default: the data's, or the draft's)")
    r.add_argument("--out", required=True, help="the trimmed draft's folder")
    return p




def cmd_generate(args):
    check_flags(args, positive=["batch_size", "max_new_tokens", "max_prompt_tokens", "magpie_max_tokens"],
                non_negative=["store_top_k"])
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--temperatures: not a list of numbers: {args.temperatures!r}")
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)   # this rank's GPU is also its default one
    tok = tokenizer.load_tokenizer(args.target)
    target = load_model(args.target, device=device, dtype=decode_dtype(device, args.dtype))
    if target.config.vocab_size < tok.vocab_size:
        raise UserError(f"{args.target}: the model has {target.config.vocab_size} tokens, its tokenizer "
                        f"{tok.vocab_size}")
    say = print if rank == 0 else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    t0 = time.time()
    manifest = generate_dataset(target, tok, prompts=args.prompts, out=args.out, target_spec=args.target,
                                temperatures=temperatures, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                top_p=args.top_p, seed=args.seed, field=args.field, limit=args.limit,
                                magpie_max_tokens=args.magpie_max_tokens, store_top_k=args.store_top_k, log=say)
    c = manifest["counts"]
    say(f"{args.out}: {c['examples']} examples, {c['completion_tokens']} completion tokens in "
        f"{c['units_done']}/{c['units_total']} work units; {c['dropped_eval']} evaluation prompts refused, "
        f"{c['duplicates_dropped']} duplicate answers dropped ({time.time() - t0:.1f} s)")
    if c["units_done"] >= c["units_total"]:
        say(f"next: python distill.py train --draft <draft folder> --target {args.target} --data {args.out}")
    if rank == 0 and args.json:
        write_json(args.json, {"out": args.out, **c, "seconds": round(time.time() - t0, 2)})


def data_target(args, fallback=None):
    """--target, or the target named in the data's manifest (the data set knows who wrote it), or fallback."""
    args.target = args.target or synthetic.read_manifest(args.data.split(",")[0]).get("target") or fallback
    if args.target is None:
        raise UserError(f"--target is needed ({args.data} has no manifest naming it)")
    return tokenizer.load_tokenizer(args.target)


def check_train_args(args):
    if not args.draft or not (args.data or args.on_policy):
        raise UserError("train needs --draft DIR and --data DIR or --on-policy SOURCES (or --resume DIR)")
    if args.loss not in LOSSES:
        raise UserError(f"unknown loss {args.loss!r} (choose {', '.join(LOSSES)})")
    if args.on_policy and args.loss == "ce":
        raise UserError("--on-policy needs a token-level --loss (kl, tvd, ce+kl, ce+tvd): the draft's own text has "
                        "no target tokens to imitate, only the target's distribution at each of its positions")
    try:
        args.rollout_temperatures = [float(t) for t in str(args.rollout_temperatures).strip("[]").split(",")]
    except ValueError:
        raise UserError(f"--rollout-temperatures: not a list of numbers: {args.rollout_temperatures!r}")
    if any(t < 0 for t in args.rollout_temperatures):
        raise UserError("--rollout-temperatures must be numbers >= 0 (0 = greedy)")
    check_flags(args, positive=["seq_len", "batch_size", "grad_accum", "epochs", "lr", "kd_temperature", "val_batches",
                                "log_every", "head_vocab", "top_k", "rollout_tokens"],
                non_negative=["min_lr", "warmup", "weight_decay", "grad_clip", "eval_every", "save_every", "stop_at",
                              "max_steps"])
    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")


def load_models(args, device):
    """The draft (from --resume or --draft), the examples of --data and, where a token-level loss needs it live,
    the target as a frozen teacher; all checked against the target's vocabulary. Returns (draft, target or None,
    tokenizer, examples): (prompt, completion) pairs, or triples with the stored top-k when the teacher is stored."""
    ttok = data_target(args) if args.data else tokenizer.load_tokenizer(args.target or "smollm2")
    args.target = args.target or ttok.spec
    draft = load_model(args.resume or args.draft, device=device, dtype=torch.float32)
    # distillation compares the two models' distributions token id by token id: one vocabulary for all
    tokenizer.check_draft_vocab(ttok, args.draft, draft.config.vocab_size)
    examples = []
    if args.data:
        synthetic.check_data_vocab(args.data, ttok)
        examples = synthetic.read_synthetic(args.data, ttok.vocab_size, top_k=args.loss != "ce")
    stored = args.loss != "ce" and not args.on_policy and all(e[2] is not None for e in examples)
    if args.teacher == "stored" and not stored:
        raise UserError("--teacher stored needs a token-level --loss and --data made by `generate --store-top-k K` "
                        "(every row), and no --on-policy")
    stored = stored and args.teacher != "live"
    examples = examples if stored else [e[:2] for e in examples]
    target = None
    if args.loss != "ce" and not stored:   # the teacher computes in the dtype it decodes in (bf16 with bf16 units)
        target = load_model(args.target, device=device, dtype=decode_dtype(device, "auto"))
        target.requires_grad_(False)
        tokenizer.check_same_vocab(ttok, vocab_size=target.config.vocab_size, what="the target model")
    return draft, target, ttok, examples


def cmd_train(args):
    meta = load_checkpoint(args.resume) if args.resume else {}
    run_args(args, TRAIN_DEFAULTS, meta.get("args"))
    args.out = args.out or args.resume or "out/aligned"
    check_train_args(args)
    device, dist = setup_distributed(pick_device(args.device))
    compile = compile_default(args.compile, device)
    say, dtype = dist.say, train_dtype(device, args.dtype)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    draft, target, ttok, examples = load_models(args, device)
    args.seq_len = args.seq_len or min(1024, draft.config.max_seq_len)
    if args.seq_len > draft.config.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the draft's context ({draft.config.max_seq_len})")
    train_rows, val_rows, too_long = [], [], 0
    if examples:
        train_rows, val_rows, too_long = synthetic.split_rows(examples, args.seq_len, args.val_fraction, args.seed)
    if args.head_vocab and args.on_policy and not (args.resume or train_rows):
        raise UserError("--head-vocab with --on-policy counts tokens in --data: give the target's data set too")
    if args.head_vocab and not args.resume:   # counted over the training completions (the target's text)
        completions = [[t for t in row[1] if t != IGNORE] for row in train_rows]
        covered = trim_to_frequent(draft, args.head_vocab, ttok, completions, say)
        say(f"head: {len(draft.head_ids)} tokens, {covered:.1%} of the training completions' tokens")
    # one row length on cuda/hpu: a new shape would be a new graph (Gaudi) or a new kernel plan; CPU pads less
    length = args.seq_len if device.type in ("cuda", "hpu") else None
    if args.on_policy:
        if args.rollout_tokens >= args.seq_len:
            raise UserError(f"--rollout-tokens {args.rollout_tokens} leaves no room for a prompt in --seq-len "
                            f"{args.seq_len}")
        train_rows = rollout_prompts(target, ttok, args.on_policy, args.out, args.seed,
                                     args.seq_len - args.rollout_tokens, log=say)   # the rows are prompts here
        batches = OnPolicyBatches(draft, train_rows, args.batch_size, max_new_tokens=args.rollout_tokens,
                                  temperatures=args.rollout_temperatures, stop_ids=ttok.stop_ids,
                                  seq_len=args.seq_len, seed=args.seed, rank=dist.rank, world_size=dist.world,
                                  device=device, length=length)
    else:
        batches = synthetic.CompletionBatches(train_rows, args.batch_size, seed=args.seed, rank=dist.rank,
                                              world_size=dist.world, device=device, length=length)
    val = val_rows[:args.val_batches * args.batch_size] if dist.rank == 0 else []   # rank 0 validates
    val_batches = [synthetic.pad_rows(val[i:i + args.batch_size], device, length)
                   for i in range(0, len(val), args.batch_size)] or None
    optimizer = configure_optimizer(draft, args.lr, args.weight_decay, device=device)
    start_step = load_checkpoint(args.resume, optimizer, batches, dist)["step"] if args.resume else 0
    rows_per_step = args.batch_size * args.grad_accum * dist.world
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_rows) / rows_per_step))
    cfg = LoopConfig(max_steps=max_steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                     grad_accum=args.grad_accum, grad_clip=args.grad_clip, dtype=dtype, eval_every=args.eval_every,
                     save_every=args.save_every, log_every=args.log_every, out=args.out, start_step=start_step,
                     stop_at=args.stop_at, compile=compile, seq_len=args.seq_len)
    teacher = "loaded as teacher" if target is not None else "vocabulary only: ce needs no teacher" \
        if args.loss == "ce" else "its top-k stored in the data: no teacher pass"
    say(f"draft {draft.num_params() / 1e6:.2f}M params on {device}; target {args.target} ({teacher}); loss {args.loss}")
    say(f"{len(examples)} examples -> {len(train_rows)} train {'prompts' if args.on_policy else 'rows'}, "
        f"{len(val_rows)} validation rows"
        f"{f', {too_long} skipped (prompt fills --seq-len)' if too_long else ''}; {max_steps} steps of "
        f"{rows_per_step} rows" + (f"; resuming at step {start_step}" if start_step else ""))
    loss_fn = make_loss_fn(target, args.loss, args.kd_temperature, args.top_k, args.kd_weight)
    report = train(draft, optimizer, batches, cfg, device=device, loss_fn=loss_fn, val_batches=val_batches, dist=dist,
                   log=say, extra={"args": vars(args), "stage": "distill", "val_history": meta.get("val_history", [])})
    if dist.rank == 0:
        if args.json:
            write_json(args.json, {"out": args.out, "loss": args.loss, **summary(report), "train_rows": len(train_rows),
                                   "val_rows": len(val_rows),
                                   "head_vocab": None if draft.head_ids is None else len(draft.head_ids)})
        vals = report["val_history"]
        if vals:
            say(f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]})")
        if report["stopped"]:
            say(f"stopped after step {report['step']}; continue with: python distill.py train --resume {args.out}")
        else:
            say(f"aligned draft saved to {args.out}/\nnext: python speculative.py --target {args.target} "
                f"--draft {args.out} --prompt \"...\" --chat --compare")
    end_run(report, dist)


def cmd_trim(args):
    """An existing draft's head keeps the K tokens most frequent in the target's completions (VocabTrim)."""
    draft = load_model(args.draft)
    tok = data_target(args, fallback=draft.config.tokenizer)
    if draft.head_ids is not None:
        raise UserError(f"{args.draft}'s head is trimmed already ({len(draft.head_ids)} tokens)")
    tokenizer.check_same_vocab(tok, vocab_size=draft.config.vocab_size, what="the draft")
    synthetic.check_data_vocab(args.data, tok)
    completions = [c for _, c in synthetic.read_synthetic(args.data, tok.vocab_size)]
    covered = trim_to_frequent(draft, args.head_vocab, tok, completions)
    save_model(draft, args.out)
    print(f"{args.out}: the head predicts {args.head_vocab} of {tok.vocab_size} tokens, {covered:.1%} of the "
          f"target's completion tokens in {args.data}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    {"generate": cmd_generate, "train": cmd_train, "trim": cmd_trim}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
