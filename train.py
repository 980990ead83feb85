"""
The training loop of pretraining (pretrain.py, FastDraft stages 1-2) and alignment (distill.py, stage 3): first the
idea (the loss, AdamW with warmup + cosine decay, one step, the loop), then machinery a student can skip. A loss_fn
is `loss_fn(draft, *batch) -> mean loss`; `batches` any iterator of tensor tuples, (x, y) with y == IGNORE not
scored, whose state_dict() (if it has one) is checkpointed so that --resume goes on with the very next batch.
"""
import contextlib
import ctypes
import dataclasses
import glob
import importlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer
from checkpoint import save_model
from common import UserError, autocast, hpu_lazy, mark_step

IGNORE = -100  # target id that is not scored (F.cross_entropy's ignore_index)

# -----------------------------------------------------------------------------------------------------------
# The loss

def next_token_loss(draft, x, y):
    """Pretraining objective: mean cross-entropy of the next token (FastDraft PT/CP; y is x shifted by one)."""
    # The matmuls run in the autocast dtype; model.head returns float32 logits, so the softmax sums in float32.
    # Memory: the logits, their log-softmax and its gradient are (B*T, V) float32 arrays, ~12 bytes per row and
    # vocabulary entry: at a 128k vocabulary keep a micro-batch near 16k rows and raise --grad-accum instead.
    logits = draft(x)                                                         # (B, T, V); V is K when trimmed
    with autocast_off(x.device):
        return F.cross_entropy(logits.flatten(0, 1), head_targets(draft, y).flatten(), ignore_index=IGNORE)


def head_targets(draft, y):
    """Targets as positions in the draft's output; IGNORE for a token a trimmed head (model.trim_head) lacks."""
    if draft.head_ids is None:
        return y
    pos = draft.head_index(y.clamp(min=0))
    return torch.where((y == IGNORE) | (pos < 0), IGNORE, pos)


def autocast_off(device):
    """Losses run outside autocast: Gaudi's bf16 autocast list includes softmax, log_softmax and mean (Intel Gaudi
    docs, PyTorch_Mixed_Precision), so a float32 loss inside autocast would still run in bf16 there."""
    return torch.autocast(torch.device(device).type, enabled=False)


# -----------------------------------------------------------------------------------------------------------
# The optimizer and the learning-rate schedule

def configure_optimizer(draft, lr, weight_decay, betas=(0.9, 0.95), device="cpu", eps=1e-8):
    """AdamW with weight decay on matrices only (not on norms or other 1-D parameters), as in GPT-3."""
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
    # fused: one kernel for all tensors; on a CPU the per-parameter loop takes longer than a small draft's step
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cuda", "cpu", "mps"))


def lr_at(step, max_steps, lr, min_lr, warmup):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)                  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -----------------------------------------------------------------------------------------------------------
# One step and the loop

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


def train_step(model, optimizer, batches, grad_accum, grad_clip, device, dtype=None, ddp=False):
    """One optimizer step (nanoGPT's): grad_accum micro-batches, gradient clipping, the AdamW update."""
    total, tokens = 0.0, 0
    for micro in range(grad_accum):
        batch = tuple(t.to(device, non_blocking=True) for t in next(batches))
        tokens += batch[0].numel()
        # DDP all-reduces gradients in every backward unless told not to: only the last micro-batch needs it
        with model.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                loss = model(*batch)
            (loss / grad_accum).backward()
        mark_step(device)   # Habana lazy mode: run the graph accumulated so far (forward + backward)
        total = total + loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    mark_step(device)       # ... and the optimizer update
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, tokens   # the loss stays on the device: reading it would make the host wait


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


def train(draft, optimizer, batches, cfg, *, device, loss_fn, val_batches=None, dist=None, extra=None, log=print):
    """Train until cfg.max_steps (or cfg.stop_at, or a signal), validating, logging and saving on the way."""
    dist = dist or Dist()
    model = wrap(draft, loss_fn, device, dist, cfg.compile)   # + torch.compile, + DDP under torchrun
    draft.train()
    progress = Progress(cfg, draft, device, dist, log)
    extra = dict(extra or {})   # JSON-able, kept in every checkpoint ({"args": ...}); its val_history goes on
    val_history = list(extra.pop("val_history", []))

    def validate(step):
        if dist.rank == 0 and val_batches:
            val = evaluate(draft, val_batches, device, cfg.dtype, loss_fn)
            progress.log(f"step {step}: val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
            val_history.append([step, val])

    if cfg.start_step == 0 or not val_history:
        validate(cfg.start_step)
    step, losses, pending, stopped = cfg.start_step, [], [], None
    progress.t_start = time.time()   # throughput and ETA count from here, after the first validation
    with stop_on_signal() as stop:
        while step < cfg.max_steps and not stopped:
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            with first_step_oom_is_user_error(step == cfg.start_step, device):
                loss, tokens = train_step(model, optimizer, batches, cfg.grad_accum, cfg.grad_clip, device,
                                          cfg.dtype, dist.ddp)
            step += 1
            pending.append(loss)
            stopped = "stop_at" if cfg.stop_at is not None and step >= cfg.stop_at else None
            validate_now = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            save_now = cfg.out and (step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0))
            # The host reads the losses only on steps that log, validate, save or stop, so other steps queue work
            # without waiting for the device. Every rank takes the same steps: a stop flag travels there too.
            if progress.due(step) or validate_now or save_now or stopped or (stop.signum and not dist.ddp):
                *sums, n_stop = reduce_sum(pending, stop.signum != 0, device, dist.ddp)
                losses += [s / dist.world for s in sums]
                pending = []
                stopped = "signal" if n_stop > 0 else stopped
            # timed after the read: the wait for the device lands in the step that waited
            progress.step(step, tokens * dist.world, time.time() - t0, None if pending else losses[-1], lr)
            if validate_now:
                validate(step)
            if cfg.out and (stopped or save_now):
                save_checkpoint(cfg.out, draft, optimizer, batches, step, dist,
                                {**extra, "world_size": dist.world, "val_history": val_history}, progress.log)
    return {"step": step, "max_steps": cfg.max_steps, "losses": losses, "first_step": cfg.start_step + 1,
            "val_history": val_history, "tokens": progress.tokens, "seconds": time.time() - progress.t_start,
            "train_seconds": progress.train_seconds, "stopped": stopped, "signal": stop.signum,
            "tokens_per_second": progress.tokens / max(progress.train_seconds, 1e-9)}


# ===========================================================================================================
# Machinery a student can skip: what makes the loop fast on accelerators (compile, DDP, TF32), survive a crash
# (atomic checkpoints, exact resume, signals) and say what it does (log lines, MFU).

class WithLoss(nn.Module):
    """The draft and its loss as one module: DDP syncs the gradients of its forward() only, compile sees both."""

    def __init__(self, draft, loss_fn):
        super().__init__()
        self.draft, self.loss_fn = draft, loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.draft, *batch)


def wrap(draft, loss_fn, device, dist, compile=False):
    """WithLoss, in DDP under torchrun, then compiled (dynamo then cuts graphs at DDP's buckets: overlap)."""
    model = WithLoss(draft, loss_fn)
    if dist.ddp:  # the buffers (RoPE tables, a trimmed head's ids) never change: no broadcast every forward
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers; the old name still works, with a warning)
        params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None, **no_sync)
    if compile:
        model = torch.compile(model, backend="hpu_backend" if device.type == "hpu" else "inductor")
    return model


def compile_default(flag, device):
    """--compile or --no-compile, else on where it pays (CUDA, Gaudi eager); a CPU's warm-up costs more."""
    lazy = device.type == "hpu" and hpu_lazy()
    if flag and lazy:
        raise UserError("--compile needs Gaudi's eager mode (PT_HPU_LAZY_MODE=0): lazy mode cannot compile")
    return flag if flag is not None else device.type == "cuda" or (device.type == "hpu" and not lazy)


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
        # float32 matmuls (--dtype float32, what autocast keeps in float32) on TF32 tensor cores: ~8x the FLOP/s
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and sys.platform == "linux":
        # glibc hands every freed block over 32 MB back to the kernel, so the step's (B*T, V) logit arrays were
        # mapped and page-faulted anew each step; kept in the heap, a cpu-small step takes 25% less time (measured)
        for option in (-3, -1):   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
            ctypes.CDLL(None).mallopt(option, 1 << 30)
    if dist.ddp:
        if device.type == "hpu":
            importlib.import_module("habana_frameworks.torch.distributed.hccl")   # registers the "hccl" backend
        torch.distributed.init_process_group(backend={"cuda": "nccl", "hpu": "hccl"}.get(device.type, "gloo"))
    return device, dist


def reduce_sum(losses, flag, device, ddp):
    """The pending losses and the stop flag, summed over the ranks in one collective: the loop's only host sync."""
    t = torch.stack([*losses, torch.tensor(float(flag), device=device)])
    t = t.to(torch.float64 if device.type == "cpu" else torch.float32)
    if ddp:
        torch.distributed.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def first_step_oom_is_user_error(first, device):
    """Out of memory at the first step is a matter of settings: say which, in one line."""
    try:
        yield
    except RuntimeError as e:
        if first and re.search("out of memory|can't allocate memory", str(e), re.I):
            raise UserError(f"out of memory at the first step on {device}: lower --batch-size or --seq-len "
                            f"(raise --grad-accum to keep the same global batch)") from None
        raise


@contextlib.contextmanager
def stop_on_signal():
    """SIGINT/SIGTERM set stop.signum: the loop saves after the current step and exits. A second Ctrl-C aborts."""
    stop = types.SimpleNamespace(signum=0)
    def handle(signum, frame):
        stop.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Dense bf16 peak FLOP/s (data sheets, no sparsity) for MFU, model FLOPs utilization (PaLM, appendix B). The first
# key found in the device's name wins: "H100 PCIe" before "H100", which is the SXM part.
PEAK_FLOPS = [("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("GAUDI3", 1835e12), ("GAUDI2", 432e12)]


def peak_flops(device_name):
    """Peak bf16 FLOP/s of a device, by its name; None for a CPU, MPS or an unlisted device."""
    return next((flops for key, flops in PEAK_FLOPS if key in device_name.upper()), None)


class Progress:
    """Rank 0's line on logging steps: loss, lr, tokens/s and MFU (train_step time only), minutes gone and to go."""

    def __init__(self, cfg, draft, device, dist, log):
        self.cfg, self.dist, self.log = cfg, dist, log
        self.flops_per_token = draft.flops_per_token(cfg.seq_len) if cfg.seq_len else None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            importlib.import_module("habana_frameworks.torch.hpu").get_device_name() if device.type == "hpu" else ""
        self.peak = peak_flops(name)
        self.t_start, self.train_seconds, self.tokens, self.since_log = time.time(), 0.0, 0, [0.0, 0]

    def due(self, step):
        return step % self.cfg.log_every == 0 or step in (self.cfg.max_steps, self.cfg.start_step + 1)

    def step(self, step, tokens, dt, loss=None, lr=None):
        """Count one step; on a logging step (loss given) print the line."""
        self.train_seconds, self.tokens = self.train_seconds + dt, self.tokens + tokens
        self.since_log = [self.since_log[0] + dt, self.since_log[1] + tokens]
        if loss is None or self.dist.rank != 0 or not self.due(step):
            return
        c, elapsed = self.cfg, time.time() - self.t_start
        tok_s = self.since_log[1] / max(self.since_log[0], 1e-9)
        line = f"step {step}/{c.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
        if self.flops_per_token:
            flops_s = self.flops_per_token * tok_s / self.dist.world   # per device
            line += f" | MFU {flops_s / self.peak:.1%}" if self.peak else f" | {flops_s / 1e12:.3f} TFLOP/s"
        eta = elapsed / (step - c.start_step) * (c.max_steps - step)
        self.log(line + f" | {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
        self.since_log = [0.0, 0]


def trim_to_frequent(draft, k, tok, token_lists, say=print):
    """--head-vocab K (VocabTrim, arXiv 2506.22694): the head keeps the K tokens most frequent in token_lists (the
    target's text; special tokens first); a trimmed draft keeps its subset. Returns the share of them it covers."""
    if draft.head_ids is None:
        draft.trim_head(tokenizer.frequent_ids(token_lists, k, tok))
    elif len(draft.head_ids) != k:
        say(f"note: the draft's head is trimmed to {len(draft.head_ids)} tokens already; it keeps that subset")
    flat = torch.as_tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    return torch.isin(flat, draft.head_ids.cpu()).float().mean().item() if len(flat) else 0.0


def summary(report):
    """The numbers pretrain.py and distill.py both report (their --json), rounded for reading."""
    vals = report["val_history"]
    return {**{k: report[k] for k in ("step", "max_steps", "losses", "val_history", "stopped")},
            "val_loss_start": vals[0][1] if vals else None, "val_loss_end": vals[-1][1] if vals else None,
            "seconds": round(report["seconds"], 2), "tokens_per_second": round(report["tokens_per_second"], 1)}


def end_run(report, dist):
    """Leave the process group; a run stopped by a signal exits 128 + signum (unfinished: `&&` must not go on)."""
    if dist.ddp:
        # every rank waits until the last has finished its work (rank 0 writes the report) before any tears its
        # connections down (a gloo rank once died with SIGABRT while leaving, its peer still writing; torch 2.13)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if report["stopped"] == "signal":
        sys.exit(128 + report["signal"])


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: the draft (checkpoint.save_model) + train_state.pt (optimizer, RNG, JSON metadata), written as
# <folder>.tmp-<pid> and swapped in: a whole checkpoint is always on disk, <folder> or, between the swap's two
# renames, <folder>.old-<pid>, which _recover_checkpoint() puts back.

SAVE_DELAY_ENV = "FASTDRAFT_TEST_SAVE_DELAY"  # tests only: seconds to sleep mid-save, to SIGKILL a half-written save


def _recover_checkpoint(folder):
    """Undo a swap interrupted between its two renames; drop what is left of it."""
    olds = glob.glob(glob.escape(folder) + ".old-*")
    whole = [d for d in olds if os.path.isfile(os.path.join(d, "train_state.pt"))]
    if whole and not os.path.isdir(folder):
        os.replace(max(whole, key=os.path.getmtime), folder)
    for d in olds:   # (the one just put back is no longer there)
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(folder, draft, optimizer, batches, step, dist, extra, log=print):
    """Rank 0 writes the draft + training state (every rank's data position) to `folder`, atomically."""
    data_state = [batches.state_dict() if hasattr(batches, "state_dict") else None]
    if dist.ddp:
        data_state, mine = [None] * dist.world, data_state[0]
        torch.distributed.all_gather_object(data_state, mine)
    if dist.rank != 0:
        return
    folder = folder.rstrip("/")
    _recover_checkpoint(folder)
    tmp, old = f"{folder}.tmp-{os.getpid()}", f"{folder}.old-{os.getpid()}"
    for d in glob.glob(glob.escape(folder) + ".tmp-*"):   # ours, or a killed save's: one process saves here
        shutil.rmtree(d, ignore_errors=True)
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
    log(f"step {step}: checkpoint saved to {folder}")


def load_checkpoint(folder, optimizer=None, batches=None, dist=None):
    """The metadata of <folder>/train_state.pt; given an optimizer (--resume), restore the whole training state."""
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
    if dist is not None and meta.get("world_size", 1) != dist.world:
        raise UserError(f"{folder} was trained by {meta.get('world_size', 1)} processes; resume it with "
                        f"the same number (got {dist.world})")
    if batches is not None and meta.get("data") and meta["data"][dist.rank] is not None:
        batches.load_state_dict(meta["data"][dist.rank])
    return meta
