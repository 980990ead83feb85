"""
Stages 1 and 2 of FastDraft (Zafrir et al., "FastDraft: How to Train Your Draft", arXiv 2411.11055):
pretrain a small draft LM with next-token prediction on natural language (PT), then continue pretraining
from that checkpoint on a code + prose mixture (CP). The draft always uses the *target's* tokenizer:
speculative decoding compares draft and target distributions token by token, so the vocabularies must match.

    python pretrain.py                                   # CPU-sized draft for SmolLM2, ~10 min on 2 idle cores
    python pretrain.py --init-from out/pretrain --data "builtin:code=0.67,builtin:prose=0.33" --out out/continued
    torchrun --nproc_per_node 8 pretrain.py --device hpu --preset fastdraft-150m \\
        --target /models/Llama-3.1-8B-Instruct --data fineweb --max-tokens 10e9 --out out/llama-draft

The file reads top to bottom as: the loss -> the optimizer and schedule -> distributed setup -> checkpoints ->
one training step -> the loop -> flags -> main(). distill.py imports the loop pieces:

    next_token_loss(draft, x, y) -> loss             the default loss_fn; y == IGNORE (-100) is not scored
    linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_rows=...) -> loss
    output_weight(draft) -> (V, C) tensor            the output layer's weight (tied or not)
    WithLoss(draft, loss_fn)                         nn.Module whose forward(*batch) is the loss (what DDP wraps)
    configure_optimizer(draft, lr, weight_decay, betas=(0.9, 0.95), device="cpu", eps=1e-8) -> AdamW
    lr_at(step, max_steps, lr, min_lr, warmup) -> float
    setup_distributed(device) -> (rank, world_size, local_rank, ddp)
    save_checkpoint(folder, draft, optimizer, step, data_state, extra=None)
    load_checkpoint(folder, optimizer=None) -> meta dict ("step", "data", "args", ... whatever extra held)
    resume_checkpoint(folder, optimizer, world) -> meta (load_checkpoint + the same-world-size check)
    RankRows(batches, rank, world_size, batch_size)  this rank's slice of each global batch (torchrun)
    replicas_identical(draft, ddp) -> bool          all ranks hold bit-identical weights
    train_step(wrapped, optimizer, batches, grad_accum, grad_clip, device, dtype=None, ddp=False)
        -> (mean loss tensor, tokens)
    evaluate(draft, batches, device, dtype=None, loss_fn=next_token_loss) -> mean loss (float)
    train(draft, optimizer, batches, *, device, max_steps, lr, ...) -> report dict   # the whole loop

A loss_fn is any `loss_fn(draft, *batch) -> scalar tensor` (mean over the scored tokens); batches is any
iterator of tuples of tensors, e.g. (x, y) here or (x, y, mask) in distill.py. If the iterator has
state_dict()/load_state_dict(), its position is saved in checkpoints so --resume is exact.
"""
import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, autocast, mark_step, train_dtype, pick_device, run_cli, sync
from checkpoint import load_model, save_model
from model import PRESETS, Transformer
import data

IGNORE = -100  # target id that is not scored (same convention as F.cross_entropy's ignore_index)
DEFAULT_PRESET = "cpu-small"

# -----------------------------------------------------------------------------------------------------------
# The loss: output layer + cross-entropy, fused and chunked
#
# With a 49k (SmolLM2) to 128k (Llama-3) vocabulary, a small draft spends most of its time and memory in the
# output layer: logits are (B*T, V) floats, and the plain `F.cross_entropy(model(x))` then walks that array
# several more times (log-softmax, its gradient, the gather). Here the logits of `chunk_rows` rows at a time are
# computed, turned into the loss *and* their gradient right away (d loss / d logits = softmax - onehot), and
# dropped: the full (B*T, V) array never exists and the backward pass has nothing left to do but hand over the
# two gradients it already holds. Same three matmuls as the plain path, a fraction of the memory traffic.


class _LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of softmax(h @ weight.T) against targets; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows):
        # h (N, C) final-normed hidden states, weight (V, C), targets (N,)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)   # stays a tensor: no device sync here
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        w = weight.to(h.dtype)                                 # under autocast h is bf16; match it like F.linear
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, tc, vc = h[s:s + chunk_rows], safe_targets[s:s + chunk_rows], valid[s:s + chunk_rows]
            logits = (hc @ w.t()).float()                                    # (n, V)
            lse = torch.logsumexp(logits, dim=-1)                            # (n,)
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)          # (n,)
            loss += ((lse - target_logit) * vc).sum()
            if not want_grad:
                continue
            # d(mean loss)/d logits = (softmax - onehot(target)) / n_valid, zero on ignored rows; in place
            g = logits.sub_(lse[:, None]).exp_()                             # (n, V) softmax
            g.scatter_add_(1, tc[:, None], -torch.ones_like(lse)[:, None])
            g.mul_((vc.to(g.dtype) / n_valid)[:, None])
            g = g.to(h.dtype)
            grad_h[s:s + chunk_rows] = g @ w                                 # (n, C)
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), hc)                                     # (V, C) += (V, n) @ (n, C)
            else:
                grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # the loss is a scalar: the chain rule is one multiply by the incoming gradient
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_loss if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=IGNORE, chunk_rows=1024):
    """Mean next-token cross-entropy of softmax(h @ weight.T), never materializing all (N, V) logits."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows)
    with torch.no_grad():  # evaluation: same chunking, no gradient buffers
        return _LinearCrossEntropy.forward(_NoCtx, h, weight, targets, ignore_index, chunk_rows)


class _NoCtx:
    """Stand-in for autograd's ctx when the fused loss runs without gradients (evaluation)."""
    needs_input_grad = (False, False, False, False, False)

    @staticmethod
    def save_for_backward(*tensors):
        pass


def output_weight(draft):
    """The (V, C) matrix of the draft's output layer (the token embedding when embeddings are tied)."""
    return draft.embed_tokens.weight if draft.lm_head is None else draft.lm_head.weight


def next_token_loss(draft, x, y):
    """Pretraining objective: mean cross-entropy of the next token (FastDraft PT/CP; y = x shifted by one)."""
    h = draft.hidden(x)                                                       # (B, T, C)
    return linear_cross_entropy(h.flatten(0, 1), output_weight(draft), y.flatten())


def plain_next_token_loss(draft, x, y):
    """The textbook version of next_token_loss (full logits, then F.cross_entropy): the reference in tests."""
    logits = draft(x)                                                         # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


LOSSES = {"fused": next_token_loss, "plain": plain_next_token_loss}


class WithLoss(nn.Module):
    """The draft plus its loss as one module. DDP only synchronizes gradients of what its wrapped module's
    forward() computed, so a loss that calls draft.hidden() must run inside forward(), not next to it."""

    def __init__(self, draft, loss_fn):
        super().__init__()
        self.draft = draft
        self.loss_fn = loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.draft, *batch)


# -----------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizer(draft, lr, weight_decay, betas=(0.9, 0.95), device="cpu", eps=1e-8):
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters), as in GPT-3;
    fused kernels on cuda/cpu/mps, Habana's FusedAdamW on hpu."""
    device = torch.device(device)
    decay = [p for p in draft.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device.type == "hpu":
        # Habana's fused kernel; its default eps is 1e-6 (torch: 1e-8), hence the explicit value.
        from habana_frameworks.torch.hpex.optimizers import FusedAdamW
        return FusedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    # One fused kernel over all tensors instead of a Python loop over parameters: on CPU the loop version
    # takes longer than the forward + backward of a small draft.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cuda", "cpu", "mps"))


def lr_at(step, max_steps, lr, min_lr, warmup):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)                  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -----------------------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun)


def setup_distributed(device):
    """Join the torchrun process group if there is one: returns (rank, world_size, local_rank, ddp)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0, False
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind == "hpu":
        import habana_frameworks.torch.distributed.hccl  # noqa: F401  (registers the "hccl" backend)
    backend = {"cuda": "nccl", "hpu": "hccl"}.get(kind, "gloo")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend)
    return rank, world_size, local_rank, True


class RankRows:
    """This rank's rows of a global batch: every rank reads the same stream of world*B rows and keeps rows
    [rank*B, (rank+1)*B). N processes x B rows then train on exactly the rows, in the same order, that one
    process with N*B rows would (equal losses, any world size); the price is that every rank tokenizes the
    whole stream, cheap next to a training step (data.py packs millions of tokens per second)."""

    def __init__(self, batches, rank, world_size, batch_size):
        self.batches, self.rank, self.world_size, self.batch_size = batches, rank, world_size, batch_size

    def __iter__(self):
        return self

    def __next__(self):
        lo = self.rank * self.batch_size
        return tuple(t[lo:lo + self.batch_size] for t in next(self.batches))   # (world*B, T) -> (B, T)

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)


def _reduce_sum(values, device, ddp):
    """Sum a few floats over all ranks in one collective (the logged loss and the stop flag travel together)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if ddp:
        torch.distributed.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: <folder>/config.json + model.safetensors (checkpoint.save_model: HF Llama layout, loads in
# transformers) + train_state.pt (optimizer tensors, RNG tensors, and a JSON string with everything else;
# loads with torch.load(weights_only=True)). The folder is written as <folder>.tmp-<pid> and then swapped in,
# so at every instant a complete checkpoint exists on disk: <folder>, or during the two renames of the swap
# <folder>.old-<pid>, which _recover_checkpoint() puts back.

SAVE_DELAY_ENV = "FASTDRAFT_TEST_SAVE_DELAY"  # tests only: seconds to sleep mid-save, to SIGKILL a half-written save


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_checkpoint(folder):
    """Undo a swap interrupted between its two renames; drop leftovers of dead saves."""
    folder = folder.rstrip("/")
    if not os.path.isdir(folder):
        olds = [d for d in glob.glob(glob.escape(folder) + ".old-*")
                if os.path.isfile(os.path.join(d, "train_state.pt"))]
        if olds:
            os.replace(max(olds, key=os.path.getmtime), folder)
    if os.path.isdir(folder):
        for d in glob.glob(glob.escape(folder) + ".old-*") + glob.glob(glob.escape(folder) + ".tmp-*"):
            pid = d.rsplit("-", 1)[-1]
            if d.endswith(".old-" + pid) or (pid.isdigit() and not _pid_alive(int(pid))):
                shutil.rmtree(d, ignore_errors=True)


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(folder, draft, optimizer, step, data_state, extra=None):
    """Write the draft + training state to `folder` atomically (a good previous checkpoint is never lost)."""
    folder = folder.rstrip("/")
    _recover_checkpoint(folder)
    tmp, old = f"{folder}.tmp-{os.getpid()}", f"{folder}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"step": step, "data": data_state, "python_rng": random.getstate(), **(extra or {})}
    save_model(draft, tmp, extra={"step": step, **{k: v for k, v in (extra or {}).items() if k != "args"}})
    if os.environ.get(SAVE_DELAY_ENV):
        time.sleep(float(os.environ[SAVE_DELAY_ENV]))
    state = {"optimizer": optimizer.state_dict(), "rng": _rng_state(), "meta": json.dumps(meta)}
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(folder):
        os.replace(folder, old)     # renaming a folder is atomic; the old one stays whole until the new one is in
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def resume_checkpoint(folder, optimizer, world):
    """load_checkpoint for --resume, plus the check that the run goes on with as many processes as it had."""
    meta = load_checkpoint(folder, optimizer=optimizer)
    if meta.get("world_size", 1) != world:
        raise UserError(f"{folder} was trained by {meta.get('world_size', 1)} processes; resume it with "
                        f"the same number (got {world})")
    return meta


def load_checkpoint(folder, optimizer=None):
    """Read <folder>/train_state.pt; restore the optimizer and RNG states; return the metadata dict."""
    folder = folder.rstrip("/")
    _recover_checkpoint(folder)
    path = os.path.join(folder, "train_state.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint to resume in {folder!r} (train_state.pt missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except UserError:
        raise
    except Exception as e:  # truncated file, not ours, or an optimizer of another shape
        raise UserError(f"checkpoint {path} is corrupt or incompatible ({type(e).__name__}: {e})".splitlines()[0])
    if optimizer is not None:  # only a real resume restores the RNG streams
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        py = meta["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    return meta


# -----------------------------------------------------------------------------------------------------------
# One optimizer step, evaluation


def train_step(wrapped, optimizer, batches, grad_accum, grad_clip, device, dtype=None, ddp=False):
    """One optimizer step: grad_accum micro-batches, gradient clipping, the AdamW update (nanoGPT's loop)."""
    total = torch.zeros((), device=device)
    tokens = 0
    for micro in range(grad_accum):
        batch = tuple(t.to(device, non_blocking=True) for t in next(batches))
        tokens += batch[0].numel()
        # DDP all-reduces gradients in every backward unless told not to: only the last micro-batch needs it.
        no_sync = wrapped.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext()
        with no_sync:
            with autocast(device, dtype):
                loss = wrapped(*batch)
            (loss / grad_accum).backward()
        mark_step(device)   # Habana lazy mode: execute the graph accumulated so far (forward + backward)
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), grad_clip)
    optimizer.step()
    mark_step(device)       # ... and the optimizer update
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, tokens


@torch.no_grad()
def evaluate(draft, batches, device, dtype=None, loss_fn=next_token_loss):
    """Mean loss over held-out batches (perplexity = exp of it)."""
    was_training = draft.training
    draft.eval()
    losses = []
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        with autocast(device, dtype):
            losses.append(loss_fn(draft, *batch).float())
    draft.train(was_training)
    return torch.stack(losses).mean().item()


# Dense bf16 peak FLOP/s per device, for MFU (model FLOPs utilization, PaLM appendix B).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "Gaudi3": 1835e12, "Gaudi2": 432e12, "GAUDI3": 1835e12, "GAUDI2": 432e12}


def peak_flops(device):
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU, MPS, unlisted cards)."""
    name = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "hpu":
        import habana_frameworks.torch.hpu as hthpu
        name = hthpu.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


def _hms(seconds):
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves after the current step and exits. A second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------------------------------------
# The loop


def train(draft, optimizer, batches, *, device, max_steps, lr, min_lr, warmup, grad_accum=1, grad_clip=1.0,
          dtype=None, loss_fn=next_token_loss, val_batches=None, eval_every=0, save_every=0, log_every=10,
          out=None, start_step=0, stop_at=None, dist=(0, 1, 0, False), extra=None, compile=False, seq_len=None,
          log=print):
    """Train until max_steps (or stop_at, or a signal); evaluate, log, checkpoint. Returns a report dict.

    batches: iterator of tuples for loss_fn(draft, *batch); a state_dict() on it is saved in checkpoints.
    extra: JSON-able dict stored in every checkpoint's metadata (e.g. {"args": vars(args)}).
    The checkpoint is written at every save_every steps, at the last step, at stop_at and on SIGINT/SIGTERM.
    """
    rank, world, local_rank, ddp = dist
    extra = dict(extra or {})
    wrapped = WithLoss(draft, loss_fn)
    if compile:
        wrapped = torch.compile(wrapped, backend="hpu_backend" if device.type == "hpu" else "inductor")
    if ddp:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[local_rank] if device.type == "cuda" else None)
    draft.train()
    flops_per_token = draft.flops_per_token(seq_len) if seq_len else None
    peak = peak_flops(device)
    show_bar = rank == 0 and sys.stderr.isatty()
    if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        log = bar.write

    def run_eval(step):
        if rank != 0 or not val_batches:
            return None
        val = evaluate(draft, val_batches, device, dtype, loss_fn)
        log(f"step {step}: val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
        return val

    def save(step, val_history):
        data_state = batches.state_dict() if hasattr(batches, "state_dict") else None
        if ddp:  # every rank's data position goes into the one checkpoint rank 0 writes
            states = [None] * world
            torch.distributed.all_gather_object(states, data_state)
        else:
            states = [data_state]
        if rank == 0:
            save_checkpoint(out, draft, optimizer, step, states,
                            {**extra, "world_size": world, "val_history": val_history})
            log(f"step {step}: checkpoint saved to {out}")

    val_history = list(extra.pop("val_history", []))
    if start_step == 0 or not val_history:
        v = run_eval(start_step)
        if v is not None:
            val_history.append([start_step, v])
    losses, tokens_seen, stopped = [], 0, None
    step = start_step
    t_start = time.time()
    train_seconds = 0.0                   # time in train_step only: evaluation and saving are not throughput
    tokens_since_log, seconds_since_log = 0, 0.0
    with _StopFlag() as stop:
        while step < max_steps:
            step_lr = lr_at(step, max_steps, lr, min_lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            t0 = time.time()
            try:
                loss, tokens = train_step(wrapped, optimizer, batches, grad_accum, grad_clip, device, dtype, ddp)
            except RuntimeError as e:
                msg = str(e).lower()
                if step == start_step and ("out of memory" in msg or "can't allocate memory" in msg):
                    raise UserError(f"out of memory at the first step on {device}: lower --batch-size or --seq-len "
                                    f"(raise --grad-accum to keep the same global batch)") from None
                raise
            step += 1
            # One collective per step: the mean loss over ranks (what a single process would log) + the stop flag.
            loss_sum, n_stop = _reduce_sum([loss.item(), float(stop.signum != 0)], device, ddp)
            loss_value = loss_sum / world
            losses.append(loss_value)
            sync(device)
            dt = time.time() - t0
            train_seconds += dt
            seconds_since_log += dt
            tokens_seen += tokens * world
            tokens_since_log += tokens * world
            if show_bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{step_lr:.2e}")
            if rank == 0 and (step % log_every == 0 or step == max_steps or step == start_step + 1):
                now = time.time()
                tok_s = tokens_since_log / max(seconds_since_log, 1e-9)
                line = f"step {step}/{max_steps} | loss {loss_value:.4f} | lr {step_lr:.2e} | {tok_s:,.0f} tok/s"
                if flops_per_token:
                    flops_s = flops_per_token * tok_s / world   # per device
                    line += f" | MFU {flops_s / peak:.1%}" if peak else f" | {flops_s / 1e12:.3f} TFLOP/s"
                eta = (now - t_start) / (step - start_step) * (max_steps - step)
                line += f" | elapsed {_hms(now - t_start)} | ETA {_hms(eta)}"
                log(line)
                tokens_since_log, seconds_since_log = 0, 0.0
            if eval_every and (step % eval_every == 0 or step == max_steps):
                v = run_eval(step)
                if v is not None:
                    val_history.append([step, v])
            elif step == max_steps and val_batches and rank == 0:
                val_history.append([step, run_eval(step)])
            if n_stop > 0:
                stopped = "signal"
            elif stop_at is not None and step >= stop_at:
                stopped = "stop_at"
            if out and (stopped or step == max_steps or (save_every and step % save_every == 0)):
                save(step, val_history)
            if stopped:
                break
    if show_bar:
        bar.close()
    elapsed = time.time() - t_start
    return {"step": step, "max_steps": max_steps, "losses": losses, "first_step": start_step + 1,
            "val_history": val_history, "tokens": tokens_seen, "seconds": elapsed,
            "train_seconds": train_seconds, "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
            "stopped": stopped, "signal": stop.signum}


# -----------------------------------------------------------------------------------------------------------
# Flags

SHAPE_FLAGS = ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "rope_theta"]
# On --resume these come from the checkpoint (they define the run); the others belong to this session.
RUN_FLAGS = ["preset", *SHAPE_FLAGS, "tokenizer", "init_from", "data", "val_data", "data_sharding", "seq_len",
             "batch_size", "grad_accum", "max_tokens", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
             "dtype", "seed", "loss", "val_batches"]


def make_parser():
    p = argparse.ArgumentParser(
        description="FastDraft stages 1-2: pretrain (or continue pretraining) a draft model in the target's "
                    "vocabulary. One device, or many under torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Stage 2 (continued pretraining): --init-from <stage-1 draft> --data \"builtin:code=0.67,"
               "builtin:prose=0.33\". Real-world: torchrun --nproc_per_node 8 pretrain.py --device hpu "
               "--preset fastdraft-150m --target <Llama-3.1-8B folder> --data fineweb --max-tokens 10e9")
    m = p.add_argument_group("draft model")
    m.add_argument("--preset", default=DEFAULT_PRESET, help=f"size preset from model.py: {', '.join(PRESETS)}")
    m.add_argument("--dim", type=int, help="hidden size (overrides the preset)")
    m.add_argument("--n-layers", type=int, help="transformer blocks (overrides the preset)")
    m.add_argument("--n-heads", type=int, help="attention heads (overrides the preset)")
    m.add_argument("--n-kv-heads", type=int, help="key/value heads, grouped-query attention (overrides the preset)")
    m.add_argument("--ffn-dim", type=int, help="SwiGLU intermediate size (overrides the preset)")
    m.add_argument("--head-dim", type=int, help="per-head size (default dim / n-heads)")
    m.add_argument("--rope-theta", type=float, help="RoPE base (overrides the preset)")
    m.add_argument("--tokenizer", "--target", dest="tokenizer", default="smollm2",
                   help="the target whose vocabulary the draft uses: 'smollm2', a HF folder, a .gguf, a draft "
                        "folder, tokenizer.json/.model (default with --init-from: the draft's own tokenizer)")
    m.add_argument("--init-from", metavar="DIR", help="start from this draft's weights with a fresh optimizer and "
                                                      "schedule (continued pretraining, FastDraft stage 2)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="builtin", help="training data spec (data.py): builtin, builtin:code, fineweb, "
                                                     "hf:NAME..., files/globs, or a mixture 'a=0.7,b=0.3'")
    d.add_argument("--data-sharding", default="rows", choices=["rows", "documents"],
                   help="under torchrun: rows = all ranks read one stream and split each global batch (the "
                        "same training as one process with the global batch); documents = each rank reads "
                        "only its own documents (less reading per rank on huge clusters)")
    d.add_argument("--val-data", help="held-out data spec (default: the held-out split of --data)")
    d.add_argument("--val-batches", type=int, default=8, help="batches per validation (0: no validation)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    d.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch per process")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    d.add_argument("--max-tokens", type=float, default=5e5,
                   help="training budget in tokens (steps = max-tokens / global batch tokens)")
    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default lr / 10)")
    o.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of the steps, at most 2000)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    o.add_argument("--dtype", default="auto", help="compute dtype under autocast: auto (bf16 on cuda/hpu, fp32 on "
                                                   "cpu), float32, bfloat16 (cpu too); weights stay fp32")
    o.add_argument("--loss", default="fused", choices=list(LOSSES),
                   help="fused: chunked output layer + cross-entropy (faster, less memory); plain: reference")
    o.add_argument("--compile", action="store_true", help="torch.compile the model (hpu_backend on Gaudi)")
    r = p.add_argument_group("run")
    r.add_argument("--out", help="checkpoint folder (default out/pretrain, or out/continued with --init-from, "
                                 "or the --resume folder)")
    r.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    r.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0: only at start and end)")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    r.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    r.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save and stop after this step, keeping the schedule of the full run (resume later)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, mps or hpu")
    r.add_argument("--seed", type=int, default=0, help="model init and data order")
    r.add_argument("--json", metavar="PATH", help="write the final numbers as one JSON object")
    return p


def explicit_flags(argv):
    """Names of the flags given on the command line (so --resume can tell them from defaults)."""
    probe = make_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def check_args(args):
    """Reject impossible values with one line (exit 2)."""
    for name in ["seq_len", "batch_size", "grad_accum", "max_tokens", "log_every", *SHAPE_FLAGS]:
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {v})")
    for name in ["lr"]:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ["min_lr", "warmup", "weight_decay", "grad_clip", "eval_every", "save_every", "stop_at",
                 "val_batches"]:
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative (got {v})")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from: {', '.join(PRESETS)})")


def build_draft(args, tok, given, device):
    """A fresh draft from --preset + shape flags, or the --init-from draft; vocabulary from the tokenizer."""
    if args.init_from:
        if given & {"preset", *SHAPE_FLAGS}:
            raise UserError("--preset and shape flags do not apply with --init-from (its shape is in its config)")
        draft = load_model(args.init_from, device=device, dtype=torch.float32)
        if draft.config.vocab_size != tok.vocab_size:
            raise UserError(f"tokenizer {tok.spec!r} has {tok.vocab_size} tokens but the --init-from draft has "
                            f"{draft.config.vocab_size}: use the tokenizer the draft was trained with")
        if draft.config.tokenizer and draft.config.tokenizer != tok.spec:
            theirs = data.load_tokenizer(draft.config.tokenizer)
            if theirs.fingerprint() != tok.fingerprint():
                raise UserError(f"tokenizer {tok.spec!r} is not the vocabulary of the --init-from draft "
                                f"({draft.config.tokenizer!r}): same size, different tokens")
        if args.seq_len > draft.config.max_seq_len:
            raise UserError(f"--seq-len {args.seq_len} exceeds the draft's context ({draft.config.max_seq_len})")
        draft.config.tokenizer = draft.config.tokenizer or tok.spec
        return draft
    shape = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    base = PRESETS[args.preset]
    config = dataclasses.replace(base, **shape, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 tokenizer=tok.spec, max_seq_len=max(base.max_seq_len, args.seq_len))
    config.eos_ids = sorted(set(tok.stop_ids) - {tok.eos_id})   # extra stop ids besides the primary eos
    torch.manual_seed(args.seed)    # every rank builds the same initial weights
    return Transformer(config).to(device)


def next_commands(out, args):
    """What to run after this stage (FastDraft: PT -> CP -> FT)."""
    if not args.init_from:
        return [f"python pretrain.py --init-from {out} --data \"builtin:code=0.67,builtin:prose=0.33\" "
                f"--out out/continued",
                f"python distill.py generate --target {args.tokenizer} --prompts magpie:96,code:builtin:code:96 "
                f"--out out/synthetic"]
    return [f"python distill.py generate --target {args.tokenizer} --prompts magpie:96,code:builtin:code:96 "
            f"--out out/synthetic",
            f"python distill.py train --draft {out} --target {args.tokenizer} --data out/synthetic --out out/aligned"]


# -----------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    given = explicit_flags(argv)
    meta = None
    if args.resume and args.init_from:
        raise UserError("--resume and --init-from exclude each other (resume continues a run; init-from starts one)")
    if args.resume:   # the run's own settings come from the checkpoint; session flags from this command line
        meta = load_checkpoint(args.resume)
        saved = meta["args"]
        for name in RUN_FLAGS:
            if name == "max_tokens" and name in given:
                continue  # extending (or shortening) the budget is allowed; the cosine schedule follows it
            if name in given and getattr(args, name) != saved[name]:
                print(f"note: --{name.replace('_', '-')} is taken from the checkpoint ({saved[name]!r})")
            setattr(args, name, saved[name])
        if not args.out:
            args.out = args.resume
    check_args(args)
    if args.init_from and "tokenizer" not in given and not args.resume:
        cfg = json.load(open(os.path.join(args.init_from, "config.json"))) if os.path.isfile(
            os.path.join(args.init_from, "config.json")) else {}
        args.tokenizer = cfg.get("fastdraft", {}).get("tokenizer") or args.tokenizer
    args.out = args.out or ("out/continued" if args.init_from else "out/pretrain")

    # setup: device, process group, tokenizer, draft, optimizer, data
    device = pick_device(args.device)
    rank, world, local_rank, ddp = setup_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = train_dtype(device, args.dtype)
    if not args.resume and os.path.isfile(os.path.join(args.out, "train_state.pt")):
        say(f"note: {args.out} holds a checkpoint; this new run replaces it at its first save "
            f"(--resume {args.out} would continue it)")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = data.load_tokenizer(args.tokenizer)
    if args.resume:
        try:
            draft = load_model(args.resume, device=device, dtype=torch.float32)
        except UserError:
            raise
        except Exception as e:  # a truncated or foreign model.safetensors / config.json
            raise UserError(f"checkpoint {args.resume} is corrupt ({type(e).__name__}: {e})".splitlines()[0])
        if draft.config.vocab_size != tok.vocab_size:
            raise UserError(f"checkpoint {args.resume} does not match tokenizer {args.tokenizer!r}")
    else:
        draft = build_draft(args, tok, given, device)
    draft.train()
    optimizer = configure_optimizer(draft, args.lr, args.weight_decay, device=device)
    start_step = 0
    if args.resume:
        meta = resume_checkpoint(args.resume, optimizer, world)
        start_step = meta["step"]
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * world
    max_steps = max(1, int(args.max_tokens) // tokens_per_step)
    warmup = args.warmup if args.warmup is not None else min(2000, max(1, max_steps // 20))
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    if args.data_sharding == "rows":   # one global stream, each rank its slice of every batch (see RankRows)
        batches = data.iterate_batches(args.data, tok, args.seq_len, args.batch_size * world, seed=args.seed)
        batches = RankRows(batches, rank, world, args.batch_size)
    else:                              # each rank its own documents (data.py's sharding): no shared stream
        batches = data.iterate_batches(args.data, tok, args.seq_len, args.batch_size, seed=args.seed, rank=rank,
                                       world_size=world, device=device)
    if meta is not None and meta.get("data") and meta["data"][rank] is not None:
        batches.load_state_dict(meta["data"][rank])
    val_batches = None
    if rank == 0 and args.val_batches:
        val_batches = data.validation_batches(args.val_data or args.data, tok, args.seq_len, args.batch_size,
                                              args.val_batches, device=device)

    n_params = draft.num_params()
    say(f"draft: {n_params / 1e6:.2f}M parameters ({draft.num_params(non_embedding=True) / 1e6:.2f}M without "
        f"embeddings), vocab {tok.vocab_size} from {tok.spec!r}, on {device}"
        f"{' (' + str(dtype).replace('torch.', '') + ' autocast)' if dtype else ''}")
    say(f"global batch: {args.batch_size} rows x {args.seq_len} tokens x {args.grad_accum} accum x {world} "
        f"process{'es' if world > 1 else ''} = {tokens_per_step:,} tokens/step; {max_steps} steps for "
        f"{max_steps * tokens_per_step:,} tokens" + (f"; resuming at step {start_step}" if start_step else ""))

    # the loop
    report = train(draft, optimizer, batches, device=device, max_steps=max_steps, lr=args.lr, min_lr=min_lr,
                   warmup=warmup, grad_accum=args.grad_accum, grad_clip=args.grad_clip, dtype=dtype,
                   loss_fn=LOSSES[args.loss], val_batches=val_batches, eval_every=args.eval_every,
                   save_every=args.save_every, log_every=args.log_every, out=args.out, start_step=start_step,
                   stop_at=args.stop_at, dist=(rank, world, local_rank, ddp), compile=args.compile,
                   seq_len=args.seq_len, log=say,
                   extra={"args": {k: v for k, v in vars(args).items()},
                          "val_history": (meta or {}).get("val_history", [])})

    in_step = replicas_identical(draft, ddp)

    # the report
    if rank == 0:
        if not in_step:
            print("warning: the ranks ended with different weights (a DDP bug or non-deterministic kernels)")
        vals = report["val_history"]
        result = {"out": args.out, "step": report["step"], "max_steps": max_steps, "params": n_params,
                  "tokens": report["tokens"], "seconds": round(report["seconds"], 2),
                  "tokens_per_second": round(report["tokens_per_second"], 1), "world_size": world,
                  "replicas_identical": in_step, "global_batch_tokens": tokens_per_step,
                  "first_step": report["first_step"], "train_seconds": round(report["train_seconds"], 2),
                  "losses": report["losses"], "val_history": vals, "stopped": report["stopped"],
                  "val_loss_start": vals[0][1] if vals else None, "val_loss_end": vals[-1][1] if vals else None}
        if vals:
            result["val_ppl_end"] = math.exp(min(vals[-1][1], 50))
        if args.json:
            tmp = f"{args.json}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, args.json)
        if vals:
            say(f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]}), "
                f"perplexity {result['val_ppl_end']:.1f}; {report['tokens_per_second']:,.0f} tokens/s")
        if report["stopped"] == "signal":
            say(f"stopped by signal {report['signal']} after step {report['step']}; checkpoint in {args.out}\n"
                f"continue with: python pretrain.py --resume {args.out}")
        elif report["stopped"] == "stop_at":
            say(f"stopped at step {report['step']} (--stop-at); continue with: python pretrain.py --resume {args.out}")
        else:
            say(f"draft saved to {args.out}/ (config.json + model.safetensors: loads in transformers too)\nnext:")
            for cmd in next_commands(args.out, args):
                say(f"  {cmd}")
    if ddp:
        torch.distributed.destroy_process_group()
    if report["stopped"] == "signal":
        sys.exit(128 + report["signal"])   # not finished: a `pretrain.py && distill.py` chain must not go on


if __name__ == "__main__":
    run_cli(main)
