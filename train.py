"""
What pretraining (pretrain.py, FastDraft stages 1-2) and alignment (distill.py, stage 3) share, in reading order:
the next-token loss, AdamW with warmup + cosine decay, torchrun setup, atomic checkpoints with exact resume, and
the training loop (nanoGPT's). A loss_fn is any `loss_fn(draft, *batch) -> scalar tensor` (mean over the scored
tokens); `batches` is any iterator of tensor tuples, (x, y) with y == IGNORE not scored. If it has state_dict() /
load_state_dict(), its position is checkpointed, so that --resume trains on exactly the batches an unbroken run would.
"""
import argparse
import contextlib
import dataclasses
import glob
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer
from checkpoint import save_model
from common import UserError, autocast, mark_step

IGNORE = -100  # target id that is not scored (F.cross_entropy's ignore_index)

# -----------------------------------------------------------------------------------------------------------
# The loss

def next_token_loss(draft, x, y):
    """Pretraining objective: mean cross-entropy of the next token (FastDraft PT/CP; y = x shifted by one)."""
    logits = draft(x)                                                         # (B, T, V) float32 (V: K if trimmed)
    with autocast_off(x.device):
        return F.cross_entropy(logits.flatten(0, 1), head_targets(draft, y).flatten(), ignore_index=IGNORE)


def autocast_off(device):
    """Losses run with autocast off: Gaudi's bf16 autocast list includes softmax, log_softmax and mean (Intel Gaudi
    docs, PyTorch_Mixed_Precision), so a loss that casts to float32 inside autocast would still run in bf16 there."""
    return torch.autocast(torch.device(device).type, enabled=False)


def head_targets(draft, y):
    """Targets as positions in the draft's output. A trimmed head (model.trim_head) scores only its K tokens, so
    the loss is the cross-entropy over that subset and a target outside it is not scored (IGNORE)."""
    if draft.head_ids is None:
        return y
    pos = draft.head_index(y.clamp(min=0))
    return torch.where((y == IGNORE) | (pos < 0), IGNORE, pos)


def trim_to_frequent(draft, k, tok, token_lists, say=print):
    """--head-vocab K (VocabTrim, arXiv 2506.22694): the head keeps the K tokens most frequent in token_lists (the
    target's text; special tokens first); a trimmed draft keeps its subset. Returns the share of them it covers."""
    if draft.head_ids is None:
        draft.trim_head(tokenizer.frequent_ids(token_lists, k, tok))
    elif len(draft.head_ids) != k:
        say(f"note: the draft's head is trimmed to {len(draft.head_ids)} tokens already; it keeps that subset")
    flat = torch.as_tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    return torch.isin(flat, draft.head_ids.cpu()).float().mean().item() if len(flat) else 0.0


class WithLoss(nn.Module):
    """The draft plus its loss as one module. DDP only synchronizes gradients of what its wrapped module's
    forward() computed, so a loss that calls draft.hidden() must run inside forward(), not next to it."""

    def __init__(self, draft, loss_fn):
        super().__init__()
        self.draft, self.loss_fn = draft, loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.draft, *batch)


# -----------------------------------------------------------------------------------------------------------
# Optional: the same loss with the output layer fused in and chunked (the default of pretrain.py --loss and of
# distill.py --loss ce; pretrain.py --loss plain runs next_token_loss above).
#
# With a 49k (SmolLM2) to 128k (Llama-3) vocabulary, a small draft spends most of its memory in the output layer:
# logits are (B*T, V) floats, kept for the backward pass, which then makes a second array of that size. Here the
# logits of `chunk_rows` rows at a time are turned into the loss *and* their gradient right away (d loss / d logits
# = softmax - onehot) and dropped. Measured on CPU, one forward + backward of cpu-small with the SmolLM2 vocabulary
# at the default 4 x 256 rows: peak memory grows by 540 MB instead of 684 MB (-21%); its speed was not measured.

def _chunked_cross_entropy(h, weight, targets, ignore_index, chunk_rows, mm_dtype, want_grad):
    """(mean loss, grad_h, grad_w) of softmax(h @ weight.T) against targets, chunk_rows rows at a time."""
    # h (N, C) final-normed hidden states, weight (V, C), targets (N,). The logits and grad_h matmuls run in
    # mm_dtype (what autocast would pick); the softmax arithmetic and grad_w in float32.
    valid = targets != ignore_index
    n_valid = valid.sum().clamp(min=1).to(torch.float32)   # stays a tensor: no device sync here
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    w = weight.to(mm_dtype)
    grad_h = torch.empty_like(h) if want_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_rows):
        hc, tc, vc = h[s:s + chunk_rows], safe_targets[s:s + chunk_rows], valid[s:s + chunk_rows]
        logits = (hc.to(mm_dtype) @ w.t()).float()                       # (n, V)
        lse = torch.logsumexp(logits, dim=-1)                            # (n,)
        target_logit = logits.gather(1, tc[:, None]).squeeze(1)          # (n,)
        loss += ((lse - target_logit) * vc).sum()
        if not want_grad:
            continue
        # d(mean loss)/d logits = (softmax - onehot(target)) / n_valid, zero on ignored rows; in place
        g = logits.sub_(lse[:, None]).exp_()                             # (n, V) softmax
        g.scatter_add_(1, tc[:, None], -torch.ones_like(lse)[:, None])
        g.mul_((vc.to(g.dtype) / n_valid)[:, None])
        grad_h[s:s + chunk_rows] = g.to(mm_dtype) @ w                    # (n, C)
        grad_w.addmm_(g.t(), hc.float())                                 # (V, C) += (V, n) @ (n, C), float32
    return loss / n_valid, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss for autograd: its gradients are computed in forward() and only scaled in backward()."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows, mm_dtype):
        loss, grad_h, grad_w = _chunked_cross_entropy(h, weight, targets, ignore_index, chunk_rows, mm_dtype, True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # the loss is a scalar: the chain rule is one multiply by the incoming gradient
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_loss if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=IGNORE, chunk_rows=1024, mm_dtype=None):
    """Mean next-token cross-entropy of softmax(h @ weight.T), never materializing all (N, V) logits."""
    mm_dtype = mm_dtype or h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows, mm_dtype)
    return _chunked_cross_entropy(h, weight, targets, ignore_index, chunk_rows, mm_dtype, False)[0]   # evaluation


def output_weight(draft):
    """The (V, C) matrix of the draft's output layer (the token embedding when tied); (K, C) when trimmed."""
    if draft.lm_head is not None:
        return draft.lm_head.weight
    w = draft.embed_tokens.weight
    return w if draft.head_ids is None else w[draft.head_ids]   # the gather passes gradients back to the rows


def fused_next_token_loss(draft, x, y):
    """next_token_loss computed through linear_cross_entropy: the same value, a fraction of the memory."""
    h = draft.hidden(x)                                                       # (B, T, C)
    device = h.device.type
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with autocast_off(h.device):
        return linear_cross_entropy(h.flatten(0, 1), output_weight(draft), head_targets(draft, y).flatten(),
                                    mm_dtype=mm_dtype)


# -----------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

def configure_optimizer(draft, lr, weight_decay, betas=(0.9, 0.95), device="cpu", eps=1e-8):
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters), as in GPT-3;
    fused kernels on cuda/cpu/mps, Habana's FusedAdamW on hpu."""
    device = torch.device(device)
    params = [p for p in draft.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if device.type == "hpu":
        try:  # Habana's fused kernel; its default eps is 1e-6 (torch: 1e-8), hence the explicit value
            from habana_frameworks.torch.hpex.optimizers import FusedAdamW
            return FusedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        except ImportError:  # some Gaudi releases refuse FusedAdamW in eager mode; torch's AdamW runs there too
            pass
    # fused: one kernel over all tensors; on CPU the per-parameter loop takes longer than a small draft's step
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

@dataclasses.dataclass
class Dist:
    """This process's place under torchrun; one process is rank 0 of 1 without DDP."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: bool = False

    def say(self, *args, **kw):   # rank 0 only: one log, not one copy per process
        if self.rank == 0:
            print(*args, **kw)


def setup_distributed(device):
    """Join the torchrun process group if there is one. Returns (device, Dist); on cuda, this rank's own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), True) if world > 1 else Dist()
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)   # also the default GPU of this rank: NCCL and new tensors land there
    if dist.ddp:
        if device.type == "hpu":
            importlib.import_module("habana_frameworks.torch.distributed.hccl")   # registers the "hccl" backend
        torch.distributed.init_process_group(backend={"cuda": "nccl", "hpu": "hccl"}.get(device.type, "gloo"))
    return device, dist


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
    except PermissionError:   # alive, another user's
        pass
    return True


def _recover_checkpoint(folder):
    """Undo a swap interrupted between its two renames; drop leftovers of dead saves."""
    olds = glob.glob(glob.escape(folder) + ".old-*")
    whole = [d for d in olds if os.path.isfile(os.path.join(d, "train_state.pt"))]
    if whole and not os.path.isdir(folder):
        os.replace(max(whole, key=os.path.getmtime), folder)
    if os.path.isdir(folder):
        for d in olds + glob.glob(glob.escape(folder) + ".tmp-*"):
            pid = d.rsplit("-", 1)[-1]
            if d in olds or (pid.isdigit() and not _pid_alive(int(pid))):
                shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(folder, draft, optimizer, step, data_state, extra=None):
    """Write the draft + training state to `folder` atomically (a good previous checkpoint is never lost)."""
    folder, extra = folder.rstrip("/"), extra or {}
    _recover_checkpoint(folder)
    tmp, old = f"{folder}.tmp-{os.getpid()}", f"{folder}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"step": step, "data": data_state, "python_rng": random.getstate(), **extra}
    save_model(draft, tmp, extra={"step": step, **{k: v for k, v in extra.items() if k != "args"}})
    if os.environ.get(SAVE_DELAY_ENV):
        time.sleep(float(os.environ[SAVE_DELAY_ENV]))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng, "meta": json.dumps(meta)},
               os.path.join(tmp, "train_state.pt"))
    if os.path.exists(folder):
        os.replace(folder, old)     # renaming a folder is atomic; the old one stays whole until the new one is in
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder, optimizer=None):
    """Read <folder>/train_state.pt; with an optimizer (a real resume), also restore its state and the RNG streams.
    Returns the metadata dict ("step", "data", "args", ... whatever `extra` held)."""
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
    except Exception as e:  # truncated file, not ours, or an optimizer of another shape
        raise UserError(f"checkpoint {path} is corrupt or incompatible ({type(e).__name__}: {e})".splitlines()[0])
    if optimizer is not None:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        py = meta["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    return meta


def check_flags(args, positive=(), non_negative=()):
    """One clear line (exit 2) for a flag that must be > 0 or >= 0; flags left unset (None) pass."""
    for names, bad, want in ((positive, lambda v: v <= 0, "positive"), (non_negative, lambda v: v < 0, "non-negative")):
        for name in names:
            if (v := getattr(args, name)) is not None and bad(v):
                raise UserError(f"--{name.replace('_', '-')} must be {want} (got {v})")


def given_flags(parser, argv):
    """The names (dest) of the flags given on the command line, so that --resume tells them from defaults.
    Overwrites the parser's defaults: pass a fresh one."""
    parsers = [parser]
    for p in parsers:   # the list grows by the subcommands' parsers as they are found
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return set(vars(parser.parse_args(argv)))


def resume_args(args, given, run_flags, may_change=()):
    """--resume: the flags that define the run (run_flags) come from the checkpoint, with a note where the command
    line says otherwise; those in may_change, and session flags (device, logging, saving), stay as given.
    --out defaults to the resumed folder. Returns the checkpoint's metadata."""
    meta = load_checkpoint(args.resume)
    for name in run_flags:
        if (name in may_change and name in given) or name not in meta["args"]:   # (a flag newer than the run)
            continue
        if name in given and getattr(args, name) != meta["args"][name]:
            print(f"note: --{name.replace('_', '-')} is taken from the checkpoint ({meta['args'][name]!r})")
        setattr(args, name, meta["args"][name])
    if "out" not in given:
        args.out = args.resume
    return meta


def restore(folder, optimizer, batches, dist):
    """--resume: the optimizer, the RNG streams and this rank's data position. Returns the step to go on from."""
    meta = load_checkpoint(folder, optimizer=optimizer)
    if meta.get("world_size", 1) != dist.world:
        raise UserError(f"{folder} was trained by {meta.get('world_size', 1)} processes; resume it with "
                        f"the same number (got {dist.world})")
    if meta.get("data") and meta["data"][dist.rank] is not None:
        batches.load_state_dict(meta["data"][dist.rank])
    return meta["step"]


# -----------------------------------------------------------------------------------------------------------
# One optimizer step, evaluation

def train_step(wrapped, optimizer, batches, grad_accum, grad_clip, device, dtype=None, ddp=False):
    """One optimizer step: grad_accum micro-batches, gradient clipping, the AdamW update (nanoGPT's loop)."""
    total, tokens = torch.zeros((), device=device), 0
    for micro in range(grad_accum):
        batch = tuple(t.to(device, non_blocking=True) for t in next(batches))
        tokens += batch[0].numel()
        # DDP all-reduces gradients in every backward unless told not to: only the last micro-batch needs it.
        with wrapped.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext():
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
    draft.eval()
    losses = []
    for batch in batches:
        with autocast(device, dtype):
            losses.append(loss_fn(draft, *(t.to(device) for t in batch)).float())
        mark_step(device)   # Habana lazy mode: one graph per batch, not one for the whole validation
    draft.train()
    return torch.stack(losses).mean().item()


# -----------------------------------------------------------------------------------------------------------
# The loop and its helpers: progress lines, signals, saving

# Dense bf16 peak FLOP/s per device, for MFU (model FLOPs utilization, PaLM appendix B).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "RTX 4090": 165e12, "GAUDI3": 1835e12, "GAUDI2": 432e12}


def _hms(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


@dataclasses.dataclass
class LoopConfig:
    """The loop's settings: the schedule, the step, and when to validate, log, save (out=None: never) and stop."""
    max_steps: int
    lr: float
    min_lr: float = None               # None: lr / 10
    warmup: int = None                 # None: 5% of the steps, at most 2000
    grad_accum: int = 1
    grad_clip: float = 1.0
    dtype: torch.dtype = None          # autocast dtype; None: full precision
    eval_every: int = 0                # 0: validate only at the start and the end
    save_every: int = 0                # 0: save only at the end (and at stop_at or on a signal)
    log_every: int = 10
    out: str = None
    start_step: int = 0
    stop_at: int = None
    compile: bool = False
    seq_len: int = None                # for FLOPs per token (MFU); None: not shown

    def __post_init__(self):
        self.min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        self.warmup = min(2000, max(1, self.max_steps // 20)) if self.warmup is None else self.warmup


class Progress:
    """Rank 0's log line on logging steps (loss, lr, tokens/s, MFU, elapsed, ETA) and, on a terminal, a tqdm bar.
    Throughput counts train_step time only: evaluation and saving are not throughput."""

    def __init__(self, cfg, draft, device, dist, log):
        self.cfg, self.dist, self.bar = cfg, dist, None
        self.flops_per_token = draft.flops_per_token(cfg.seq_len) if cfg.seq_len else None
        hpu = device.type == "hpu" and importlib.import_module("habana_frameworks.torch.hpu")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else hpu.get_device_name() if hpu else ""
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name.upper()), None)   # None: CPU, MPS, unlisted
        if dist.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=cfg.start_step, unit="step", dynamic_ncols=True)
        self.log = self.bar.write if self.bar else log
        self.t_start = time.time()   # restarted after the first validation
        self.train_seconds, self.tokens, self.since_log = 0.0, 0, [0.0, 0]

    def due(self, step):
        c = self.cfg
        return step % c.log_every == 0 or step == c.max_steps or step == c.start_step + 1

    def step(self, step, tokens, dt, loss=None, lr=None):
        """Count one step; on a logging step (loss given) print the line."""
        self.train_seconds, self.tokens = self.train_seconds + dt, self.tokens + tokens
        self.since_log = [self.since_log[0] + dt, self.since_log[1] + tokens]
        if self.bar:
            self.bar.update(1)
        if loss is None or self.dist.rank != 0 or not self.due(step):
            return
        if self.bar:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        c, now = self.cfg, time.time()
        tok_s = self.since_log[1] / max(self.since_log[0], 1e-9)
        line = f"step {step}/{c.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
        if self.flops_per_token:
            flops_s = self.flops_per_token * tok_s / self.dist.world   # per device
            line += f" | MFU {flops_s / self.peak:.1%}" if self.peak else f" | {flops_s / 1e12:.3f} TFLOP/s"
        eta = (now - self.t_start) / (step - c.start_step) * (c.max_steps - step)
        self.log(line + f" | elapsed {_hms(now - self.t_start)} | ETA {_hms(eta)}")
        self.since_log = [0.0, 0]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves after the current step and exits. A second Ctrl-C aborts."""

    def __enter__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _wrap(draft, loss_fn, device, dist, compile=False):
    """What train_step calls: WithLoss, torch.compile'd if asked, inside DDP under torchrun."""
    wrapped = WithLoss(draft, loss_fn)
    if compile:
        wrapped = torch.compile(wrapped, backend="hpu_backend" if device.type == "hpu" else "inductor")
    if dist.ddp:  # the buffers (RoPE tables, a trimmed head's ids) never change: no broadcast every forward
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[dist.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    return wrapped


def _reduce_sum(losses, flag, device, ddp):
    """The pending step losses and the stop flag, summed over all ranks in one collective. The host waits for the
    device here only (tolist), so a step that logs nothing queues work without a sync."""
    t = torch.stack([*losses, torch.tensor(float(flag), device=device)])
    t = t.to(torch.float64 if device.type == "cpu" else torch.float32)
    if ddp:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _save(out, draft, optimizer, batches, step, dist, meta, log):
    """Checkpoint at `step`: every rank's data position goes into the one checkpoint rank 0 writes."""
    states = [batches.state_dict() if hasattr(batches, "state_dict") else None]
    if dist.ddp:
        states, mine = [None] * dist.world, states[0]
        torch.distributed.all_gather_object(states, mine)
    if dist.rank == 0:
        save_checkpoint(out, draft, optimizer, step, states, meta)
        log(f"step {step}: checkpoint saved to {out}")


def train(draft, optimizer, batches, cfg, *, device, loss_fn, val_batches=None, dist=Dist(), extra=None, log=print):
    """Train until cfg.max_steps (or cfg.stop_at, or SIGINT/SIGTERM); validate, log, checkpoint. Returns a report.
    extra: a JSON-able dict kept in every checkpoint (e.g. {"args": vars(args)}); its "val_history" is continued."""
    wrapped = _wrap(draft, loss_fn, device, dist, cfg.compile)
    draft.train()
    progress = Progress(cfg, draft, device, dist, log)
    extra = dict(extra or {})
    val_history = list(extra.pop("val_history", []))

    def validate(step):
        if dist.rank == 0 and val_batches:
            val = evaluate(draft, val_batches, device, cfg.dtype, loss_fn)
            progress.log(f"step {step}: val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
            val_history.append([step, val])

    if cfg.start_step == 0 or not val_history:
        validate(cfg.start_step)
    step, losses, pending, stopped = cfg.start_step, [], [], None
    progress.t_start = time.time()
    with _StopFlag() as stop:
        while step < cfg.max_steps and not stopped:
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            try:
                loss, tokens = train_step(wrapped, optimizer, batches, cfg.grad_accum, cfg.grad_clip, device,
                                          cfg.dtype, dist.ddp)
            except RuntimeError as e:  # out of memory at the first step is a matter of settings: say which
                if step == cfg.start_step and re.search("out of memory|can't allocate memory", str(e), re.I):
                    raise UserError(f"out of memory at the first step on {device}: lower --batch-size or --seq-len "
                                    f"(raise --grad-accum to keep the same global batch)") from None
                raise
            step += 1
            pending.append(loss)
            stopped = "stop_at" if cfg.stop_at is not None and step >= cfg.stop_at else None
            validate_now = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            save_now = cfg.out and (step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0))
            # The host reads the losses only on steps that log, validate, save or stop; every rank takes the same
            # steps, so the stop flag travels there too (under torchrun a signal is seen at the next such step).
            if progress.due(step) or validate_now or save_now or stopped or (stop.signum and not dist.ddp):
                *sums, n_stop = _reduce_sum(pending, stop.signum != 0, device, dist.ddp)
                losses += [s / dist.world for s in sums]
                pending = []
                stopped = "signal" if n_stop > 0 else stopped
            progress.step(step, tokens * dist.world, time.time() - t0, None if pending else losses[-1], lr)
            if validate_now:
                validate(step)
            if cfg.out and (stopped or save_now):
                _save(cfg.out, draft, optimizer, batches, step, dist,
                      {**extra, "world_size": dist.world, "val_history": val_history}, progress.log)
    if progress.bar:
        progress.bar.close()
    return {"step": step, "max_steps": cfg.max_steps, "losses": losses, "first_step": cfg.start_step + 1,
            "val_history": val_history, "tokens": progress.tokens, "seconds": time.time() - progress.t_start,
            "train_seconds": progress.train_seconds, "stopped": stopped, "signal": stop.signum,
            "tokens_per_second": progress.tokens / max(progress.train_seconds, 1e-9)}


def summary(report):
    """The numbers pretrain.py and distill.py both report (their --json), rounded for reading."""
    vals = report["val_history"]
    return {"step": report["step"], "max_steps": report["max_steps"], "losses": report["losses"],
            "val_history": vals, "val_loss_start": vals[0][1] if vals else None,
            "val_loss_end": vals[-1][1] if vals else None, "seconds": round(report["seconds"], 2),
            "tokens_per_second": round(report["tokens_per_second"], 1), "stopped": report["stopped"]}


def end_run(report, dist):
    """Leave the process group. A run stopped by a signal exits 128 + signum: it is not finished, so a
    `pretrain.py && distill.py` chain must not go on."""
    if dist.ddp:
        torch.distributed.destroy_process_group()
    if report["stopped"] == "signal":
        sys.exit(128 + report["signal"])
