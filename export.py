"""
Export a draft (or any model we load) where people deploy models: a llama.cpp GGUF carrying the
target's tokenizer metadata, and a Hugging Face Llama folder that transformers and vLLM load as an
independent draft.

The real question is a trimmed head (VocabTrim / FR-Spec: the draft predicts K of V tokens).
Runtimes know only full-vocabulary Llama heads, and a llama GGUF has no output bias, so the V - K
rows the draft never trained must be written as something. Tied to the embedding (the draft as
trained) they hold most of the softmax mass and often win the argmax; zeroed they keep the argmax
but still hold ~60% of the mass (41k logits at 0), which a runtime that samples its drafts, or stops
drafting below a confidence, pays for. We export an untied head whose K subset rows are the trained
ones (the subset logits are ours, bit for bit) and whose other rows are one row w fitted, body
frozen, on the draft's own final hidden states h to minimise the mass outside the subset:
    loss = mean over positions of logsumexp(all logits) - logsumexp(subset logits)
         = mean log(1 + (V - K) exp(h.w) / sum_subset exp(logit)).
Fitting each outside row on its own gains nothing: the loss is convex in the rows and symmetric
under swapping them, so a common row is optimal; one (dim,) vector fits in seconds, stored in 6 kB.
Where the hidden states lie on one side of a hyperplane (ours do) the mass goes to ~0, and the
exported draft proposes what the trimmed one proposes, greedy or sampled.

  python export.py --draft drafts/smollm2-135m --out out/export       # draft.gguf + draft-hf/
  python export.py --model smollm2 --formats gguf --out out/export    # the target in F16: model.gguf
  python export.py --draft DIR --fit-data ALIGN1,ALIGN2 --keep-fill   # refit on the alignment data
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import checkpoint
import common
import data
import synthetic
import tokenizer
from common import UserError

FIT_DATA = "builtin:code,builtin:prose"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


# -----------------------------------------------------------------------------
# the head: fit the row every token outside the subset gets

def fit_sequences(spec, tok, vocab_size, n_tokens, seq_len=256):
    """Token lists to fit on, about n_tokens in all: alignment folders (`distill.py generate`: prompt +
    the target's answer, the text a draft meets when serving) and data.py sources, comma-joined, in turn."""
    streams = []
    for part in spec.split(","):
        if Path(part).is_dir() and any(Path(part).glob("shard-*.jsonl")):
            streams.append(p + c for p, c in synthetic.read_synthetic(part, vocab_size))
        else:
            streams.append(tok.encode(text) for text in data.read_documents(part))
    out, total = [], 0
    while streams and total < n_tokens:
        for s in list(streams):  # round robin, so every source is in the sample
            ids = next(s, None)
            if ids is None:
                streams.remove(s)
                continue
            pieces = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
            out += [p for p in pieces if len(p) >= 8]
            total += sum(len(p) for p in pieces)
    if len(out) < 2:  # one to fit on, one to judge
        raise UserError(f"--fit-data {spec}: too little text to fit the head on ({total} tokens)")
    return out


@torch.no_grad()
def final_hidden(model, seqs):
    """The draft's final-normed hidden states (N, dim) float32 over the sequences, in batches of equal length
    (one forward per sequence is 10x slower where other processes share the cores)."""
    by_length = {}
    for ids in seqs:
        by_length.setdefault(len(ids), []).append(ids)
    out = []
    for group in by_length.values():
        for i in range(0, len(group), 16):
            out.append(model.hidden(torch.tensor(group[i:i + 16])).flatten(0, 1).float())  # (B*T, dim)
    return torch.cat(out)


@torch.no_grad()
def subset_logsumexp(model, h):
    """logsumexp over the trimmed head's K logits, per position (N,)."""
    return torch.cat([model.head(part).logsumexp(-1) for part in h.split(4096)])


def fit_fill(model, h):
    """The common outside row w minimising mean log(1 + (V-K) exp(h.w) / Z_subset) (module docstring); L-BFGS."""
    z_sub = subset_logsumexp(model, h)
    log_outside = torch.log(torch.tensor(float(model.config.vocab_size - len(model.head_ids))))
    w = torch.zeros(h.size(1), requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.logaddexp(z_sub, h @ w + log_outside) - z_sub).mean()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


@torch.no_grad()
def head_report(model, weight, h):
    """Outside-subset softmax mass (mean, 99th percentile) of a full head `weight` (V, dim), and how often its
    argmax is the trimmed head's, over hidden states h."""
    ids, mass, same = model.head_ids, [], []
    for part in h.split(4096):
        logits = part @ weight.T                                          # (n, V)
        mass.append(1 - (logits[:, ids].logsumexp(-1) - logits.logsumexp(-1)).exp())
        same.append(logits.argmax(-1) == ids[model.head(part).argmax(-1)])
    mass = torch.cat(mass).clamp(min=0)
    return {"outside_mass": round(mass.mean().item(), 5), "outside_mass_p99": round(mass.quantile(0.99).item(), 5),
            "argmax_agreement": round(torch.cat(same).float().mean().item(), 5), "positions": len(mass)}


def repaired_head(model, args, tok, folder):
    """(full-head model, report): the fill row stored beside the draft, or one fitted now on --fit-data; the
    report compares the tied, zero-filled and fitted heads on every 10th fit sequence, held out."""
    stored = checkpoint.read_head_fill(folder) if folder and args.fit_data is None else None
    if stored is None and args.fit_data is None and folder and (Path(folder) / checkpoint.HEAD_FILL).is_file():
        print(f"note: {checkpoint.HEAD_FILL} was fitted for other weights; refitting on {FIT_DATA} (pass "
              f"--fit-data ALIGN_DIR,... --keep-fill to fit on the text the draft serves)", file=sys.stderr)
    seqs = fit_sequences(args.fit_data or FIT_DATA, tok, model.config.vocab_size, args.fit_tokens)
    held_out, fit_on = seqs[::10], [s for i, s in enumerate(seqs) if i % 10]
    dtype = model.embed_tokens.weight.dtype
    model.float()  # fit and judge in float32; bf16 -> f32 -> bf16 gives the same weights back
    h_held = final_hidden(model, held_out)
    if stored is not None:
        fill, report = torch.tensor(stored, dtype=torch.float32), {"fill": "stored"}
    else:
        h_fit = final_hidden(model, fit_on)
        fill = fit_fill(model, h_fit)
        report = {"fill": f"fitted on {args.fit_data or FIT_DATA}", "fit_positions": len(h_fit)}
    report["fill_norm"] = round(fill.norm().item(), 3)
    if model.lm_head is None:  # the naive export: the tied embedding as the head of every token
        report["tied"] = head_report(model, model.embed_tokens.weight, h_held)
    for name, row in (("zeros", torch.zeros_like(fill)), ("fitted", fill)):
        report[name] = head_report(model, checkpoint.full_head(model, row).lm_head.weight, h_held)
    if args.keep_fill and folder:
        common.write_json(Path(folder) / checkpoint.HEAD_FILL, {
            "row": fill.tolist(), "weights_digest": checkpoint.weights_digest(folder),
            "fitted_on": args.fit_data or FIT_DATA, "held_out": report["fitted"]})
    return checkpoint.full_head(model.to(dtype), fill), report


# -----------------------------------------------------------------------------
# writing

def tokenizer_source(target):
    """The GGUF whose tokenizer metadata the export carries: --target, else the model itself or its target."""
    path = Path(checkpoint.resolve_spec(target))
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise UserError(f"--target {target}: a GGUF needs the target's tokenizer as llama.cpp reads it; convert "
                            f"the target with llama.cpp's convert_hf_to_gguf.py and pass that .gguf "
                            f"(or --formats hf)")
        path = found[0]
    return path


def write_hf(model, folder, target, extra):
    """The HF Llama folder (save_model), plus the target's tokenizer files when it is a HF folder."""
    checkpoint.save_model(model, folder, extra=extra)
    source = Path(checkpoint.resolve_spec(target))
    for name in TOKENIZER_FILES if source.is_dir() else ():
        if (source / name).is_file():
            shutil.copy(source / name, Path(folder) / name)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a draft (or any model) as a llama.cpp GGUF and a Hugging Face "
                                "folder for transformers / vLLM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--draft", help="draft folder (a trimmed head is exported full, see --fit-data)")
    which.add_argument("--model", help="any other model spec to export as is (e.g. smollm2 -> an F16 GGUF)")
    p.add_argument("--target", default=None, help="the target whose tokenizer metadata the GGUF carries (a .gguf, "
                   "smollm2, or a folder with a .gguf); default: the model's own tokenizer spec")
    p.add_argument("--out", required=True, help="output folder: draft.gguf + draft-hf/ (model.* with --model)")
    p.add_argument("--formats", default="gguf,hf", help="comma list of gguf,hf")
    p.add_argument("--gguf-type", default="f16", choices=checkpoint.GGUF_TYPES, help="GGUF matrix type")
    p.add_argument("--fit-data", default=None, help="refit the outside-subset head row on these: alignment folders "
                   f"(distill.py generate) and/or data.py sources, comma list (default: the stored row, else "
                   f"{FIT_DATA})")
    p.add_argument("--fit-tokens", type=int, default=30000, help="positions to fit the row on (about)")
    p.add_argument("--keep-fill", action="store_true", help="store the fitted row in the draft folder "
                   f"({checkpoint.HEAD_FILL}): later exports and bench.py --peer hf use it")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - {"gguf", "hf"}:
        raise UserError(f"--formats {args.formats!r}: choose from gguf,hf")
    if args.fit_tokens < 100:
        raise UserError("--fit-tokens must be >= 100")
    started = time.perf_counter()
    spec, stem = (args.draft, "draft") if args.draft else (args.model, "model")
    model = checkpoint.load_model(spec)
    target = args.target or model.config.tokenizer or spec
    tok = tokenizer.load_tokenizer(target)
    tokenizer.check_draft_vocab(tok, spec, model.config.vocab_size, what="the model")
    fields = checkpoint.gguf_tokenizer_fields(tokenizer_source(target)) if "gguf" in formats else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": spec, "target": target, "params": model.num_params()}
    folder = Path(checkpoint.resolve_spec(spec))
    if model.head_ids is not None:
        model, report["head"] = repaired_head(model, args, tok, folder if folder.is_dir() else None)
    with torch.no_grad():
        if "gguf" in formats:
            checkpoint.save_gguf(model, out / f"{stem}.gguf", fields, args.gguf_type, name=f"fastdraft-{stem}")
            report["gguf"] = str(out / f"{stem}.gguf")
        if "hf" in formats:
            write_hf(model, out / f"{stem}-hf", target, {"exported_from": str(spec)})
            report["hf"] = str(out / f"{stem}-hf")
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.json:
        common.write_json(args.json, report)


if __name__ == "__main__":
    common.run_cli(main)
