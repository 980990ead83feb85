"""
The first command to run on a new machine or device: does this setup train and decode correctly?
    python smoke.py --device cuda          # or hpu, mps, cpu, auto
Small end-to-end checks, one line each: pretraining with an exact stop and resume, greedy speculative decoding equal
to greedy autoregressive decoding (float32), batched generation equal to one row at a time. The exit code is the
number of failed checks. A few minutes on a CPU; seconds on a GPU.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import checkpoint
import common
import speculative
import tokenizer


def run_script(args, what):
    """Run one of our scripts; a failure is a failed check, with the script's last lines as the reason."""
    p = subprocess.run([sys.executable, *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}")


def check_training(device, out):
    """Pretrain a tiny draft for 6 steps in one go, and again as 3 steps + resume: the losses must agree."""
    args = ["pretrain.py", "--device", device, "--preset", "tiny", "--data", "builtin:code", "--seq-len", "64",
            "--batch-size", "4", "--max-tokens", str(6 * 4 * 64), "--eval-every", "0", "--log-every", "1",
            "--seed", "0"]
    run_script(args + ["--out", f"{out}/whole", "--json", f"{out}/whole.json"], "pretraining")
    run_script(args + ["--out", f"{out}/split", "--stop-at", "3"], "pretraining to step 3")
    run_script(["pretrain.py", "--resume", f"{out}/split", "--json", f"{out}/split.json"], "resuming")
    lw, ls = (json.load(open(f"{out}/{n}.json")).get("losses") or [] for n in ("whole", "split"))
    if not lw or lw[-1] != lw[-1]:
        raise RuntimeError(f"no finite training loss in {out}/whole.json")
    if lw[-3:] != ls[-3:]:
        raise RuntimeError(f"resumed losses {ls[-3:]} differ from the uninterrupted run's {lw[-3:]}")
    return f"6 steps, loss {lw[0]:.3f} -> {lw[-1]:.3f}; stop at 3 + resume gives the same losses"


def check_speculative(device, target_spec, draft_dir, tok):
    """Greedy speculative decoding == greedy autoregressive decoding, token for token, in float32."""
    target = checkpoint.load_model(target_spec, device=device, dtype=torch.float32)
    draft = checkpoint.load_model(draft_dir, device=device, dtype=torch.float32)
    prompt = tok.encode("def fibonacci(n):")
    ar, _ = speculative.autoregressive(target, prompt, 32, temperature=0.0)
    rates = []
    for name, d in (("self", target), ("tiny draft", draft)):
        sd, stats = speculative.generate(target, d, prompt, 32, gamma=3, temperature=0.0)
        if sd != ar:
            first = next(i for i, (a, b) in enumerate(zip(sd, ar)) if a != b)
            raise RuntimeError(f"greedy SD with the {name} as draft differs from AR at token {first}")
        rates.append(f"{name}: acceptance {stats['acceptance_rate']:.2f}")
    return f"greedy SD == AR for 32 tokens ({', '.join(rates)})"


def check_batched_generation(device, target_spec, tok):
    """Batched left-padded generation gives each row exactly what one-row generation gives."""
    import generation
    target = checkpoint.load_model(target_spec, device=device, dtype=torch.float32)
    prompts = [tok.encode(t) for t in ("def add(a, b):", "The sky is", "import os\nimport sys\n\ndef main():")]
    static = device.type in ("cuda", "hpu")   # the fixed-shape path those devices use
    batched = generation.generate_batch(target, prompts, 12, temperature=0.0, static=static)[0]
    single = [generation.generate_batch(target, [p], 12, temperature=0.0, static=static)[0][0] for p in prompts]
    if batched != single:
        raise RuntimeError("batched greedy generation differs from one row at a time")
    return f"{len(prompts)} rows, batched == one at a time"


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|hpu")
    p.add_argument("--target", default="smollm2", help="the target model for the decoding checks")
    args = p.parse_args()
    device = common.pick_device(args.device)
    tok = tokenizer.load_tokenizer(args.target)
    mode = f", {'lazy' if common.hpu_lazy() else 'eager'} mode" if device.type == "hpu" else ""
    print(f"torch {torch.__version__}, device {device}{mode}, target {args.target}")
    failed = 0
    with tempfile.TemporaryDirectory() as out:
        for name, fn in [("training and resume", lambda: check_training(device.type, out)),
                         ("speculative decoding", lambda: check_speculative(device, args.target, f"{out}/whole", tok)),
                         ("batched generation", lambda: check_batched_generation(device, args.target, tok))]:
            t0 = time.time()
            try:
                print(f"ok    {name}: {fn()} ({time.time() - t0:.0f} s)")
            except Exception as e:  # a failed check is reported and counted, and the next one still runs
                failed += 1
                print(f"FAIL  {name}: {type(e).__name__}: {e}")
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    sys.exit(failed)


if __name__ == "__main__":
    common.run_cli(main)
