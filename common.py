"""What every script shares and none of them teaches: user errors, the CLI runner, atomic writes, devices."""

import importlib.util
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch


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


def write_atomic(path, text):
    """Write a text file all at once: a temporary sibling is renamed over `path`, so no reader sees half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    """Write one JSON object (indented, trailing newline) atomically; the one JSON writer of the project."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


# -----------------------------------------------------------------------------
# Devices

def pick_device(name="auto"):
    """torch.device for auto|cpu|cuda|mps|hpu; a UserError when the asked-for one is absent."""
    name = (name or "auto").lower()
    has = {"hpu": _has_hpu, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available,
           "cpu": lambda: True}
    if name == "auto":
        return torch.device(next(kind for kind in ("hpu", "cuda", "mps", "cpu") if has[kind]()))
    kind = "cuda" if name.startswith("cuda:") else name
    if kind not in has:
        raise UserError(f"unknown device {name!r} (choose auto, cpu, cuda, mps or hpu)")
    if kind == "hpu" and importlib.util.find_spec("habana_frameworks") is None:
        raise UserError("--device hpu needs Habana's PyTorch bridge (habana_frameworks), not installed here")
    if not has[kind]():
        absent = {"cuda": "no CUDA GPU is available here", "mps": "Apple's Metal backend is not available here",
                  "hpu": "the Habana bridge is installed but no Gaudi device is available"}
        raise UserError(f"--device {name}: {absent[kind]}")
    return torch.device(name)


def _has_hpu():
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        _import_habana()
    except Exception as e:  # e.g. a torch from PyPI over the image's own: say so, never fall back silently
        raise UserError(f"Habana's bridge is installed but failed to import ({type(e).__name__}: {e}); "
                        f"is the torch it was built for installed?") from e
    return torch.hpu.is_available()


def _import_habana():
    # Since Intel Gaudi 1.18 `import torch` loads the bridge itself, so the execution mode is whatever the shell
    # chose (PT_HPU_LAZY_MODE, read at that import); setting it here would come too late. hpu_lazy() tells which.
    import habana_frameworks.torch.core as htcore
    return htcore


def hpu_lazy():
    """True when the Gaudi bridge runs in (legacy) lazy mode, where graphs accumulate until mark_step().
    Eager mode (+ torch.compile) is current Gaudi's default (docs.habana.ai, "PyTorch Gaudi Theory of Operations")."""
    try:
        from habana_frameworks.torch.utils.internal import is_lazy  # the bridge's own answer (optimum-habana uses it)
        return bool(is_lazy())
    except ImportError:
        return os.environ.get("PT_HPU_LAZY_MODE", "0") == "1"


def mark_step(device):
    """In Habana's lazy mode, cut the accumulated graph and run it (after backward, after optimizer.step())."""
    if torch.device(device).type == "hpu" and hpu_lazy():
        _import_habana().mark_step()


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


def timed(fn, device):
    """fn()'s result and wall-clock seconds, with the device drained on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def has_float64(device):
    """Gaudi has no float64 (Intel Gaudi Support Matrix), nor has Apple's Metal backend."""
    return torch.device(device).type not in ("hpu", "mps")


def cpu_has_bf16():
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo flags):
    there bf16 matmuls run at about twice fp32's speed, elsewhere they are emulated and slower."""
    try:
        return bool({"avx512_bf16", "amx_bf16"} & set(Path("/proc/cpuinfo").read_text().split()))
    except OSError:
        return False


def cpu_name():
    """This CPU's model name (Linux /proc/cpuinfo), or the platform's processor string: a cache key for timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_file(name):
    """A file in this user's cache for fastdraft ($FASTDRAFT_CACHE, else ~/.cache/fastdraft): per-machine facts."""
    folder = Path(os.environ.get("FASTDRAFT_CACHE") or Path.home() / ".cache" / "fastdraft")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


_DTYPES = {"auto": None, None: None, "float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name):
    """"auto" -> None (the checkpoint's own), else float32 | bfloat16 | float16 (short names accepted)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    return _DTYPES[name]


def decode_dtype(device, name="auto"):
    """The --dtype flag of a decoding script -> the weights' dtype. auto: bf16 on cuda / hpu and on a CPU with bf16
    matrix units, float32 elsewhere. This rule suits batched generation; whether bf16 pays at batch 1 on a CPU
    depends on the CPU, so speculative.py and bench.py measure that instead (speculative.fastest_dtypes)."""
    kind = torch.device(device).type
    bf16 = kind in ("cuda", "hpu") or (kind == "cpu" and cpu_has_bf16())
    return parse_dtype(name) or (torch.bfloat16 if bf16 else torch.float32)


def measure_decode_dtype(device, name="auto"):
    """True where --dtype auto must be decided by timing both dtypes: batch-1 decoding on a CPU with bf16 units
    (AMD's avx512_bf16 decodes SmolLM2 2.4x faster in bf16, Intel's AMX 0.93x: README, "Which dtype")."""
    return parse_dtype(name) is None and torch.device(device).type == "cpu" and cpu_has_bf16()


def train_dtype(device, name):
    """The --dtype flag of a training script -> the autocast dtype of each step (None: full precision).
    auto: bf16 on cuda/hpu, full precision on cpu/mps; bfloat16 turns autocast on for the cpu too."""
    kind, dtype = torch.device(device).type, parse_dtype(name)
    if dtype is None:
        return torch.bfloat16 if kind in ("cuda", "hpu") else None
    if dtype == torch.float16:
        raise UserError("--dtype float16 needs loss scaling, which this training loop does not do: use bfloat16")
    if dtype != torch.float32 and kind == "mps":
        raise UserError(f"--dtype {name}: no autocast on mps here; use float32")
    return None if dtype == torch.float32 else dtype


def autocast(device, dtype=None):
    """Mixed precision for one training step, in train_dtype()'s dtype; None (or float32): full precision."""
    if dtype in (None, torch.float32):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# -----------------------------------------------------------------------------
# Training flags (pretrain.py, distill.py train)

def check_flags(args, positive=(), non_negative=()):
    """One clear line (exit 2) for a flag that must be > 0 or >= 0; flags left unset (None) pass."""
    for names, bad, want in ((positive, lambda v: v <= 0, "positive"), (non_negative, lambda v: v < 0, "non-negative")):
        for name in names:
            if (v := getattr(args, name)) is not None and bad(v):
                raise UserError(f"--{name.replace('_', '-')} must be {want} (got {v})")


def run_args(args, defaults, saved=None, may_change=()):
    """The --resume rule. The flags that define a run (the keys of `defaults`) have no argparse default
    (argparse.SUPPRESS), so `args` holds only those given; each then takes the first of: the checkpoint's value
    (`saved`, on --resume; a different one given now is noted and ignored unless in may_change), the value given,
    its default. Returns the names given."""
    given, saved = {name for name in defaults if hasattr(args, name)}, saved or {}
    for name, default in defaults.items():
        if name in saved and not (name in given and name in may_change):
            if name in given and getattr(args, name) != saved[name]:
                print(f"note: --{name.replace('_', '-')} is taken from the checkpoint ({saved[name]!r})")
            setattr(args, name, saved[name])
        elif name not in given:
            setattr(args, name, default)
    return given
