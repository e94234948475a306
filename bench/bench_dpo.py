"""DPO + LoRA training throughput: TRL 1.16 DPOTrainer against seqdpo's training path, side by side.

One process builds one randomly initialised Llama (no download), then for each length distribution
runs, on the same pairs in the same order (sequential sampler for every mode):

  trl            TRL DPOTrainer, reference = adapter disabled, computed live (TRL's default)
  trl_pre        TRL DPOTrainer with precompute_ref_log_probs=True (its pass timed separately)
  seqdpo         seqdpo.trainer.SeqDPOTrainer with model.packing=pair (prompt + chosen and prompt +
                 rejected packed padding-free, LM head on scored positions only) and the base
                 reference log-probs precomputed by seqdpo.refcache (pass timed separately)
  seqdpo_shared  the same with model.packing=shared_prompt (each pair's prompt computed once)
  seqdpo_chunked seqdpo with TRL's chunked LM-head kernel on the CPU too (what an accelerator runs; on
                 the CPU, seqdpo before its own CPU LM head); not in the default modes
  eval, eval_shared  one stage x objective evaluation pass (seqdpo.logprobs.dataset_logps, adapter
                 on) in the pair and the shared_prompt layout

Length distributions: `equal` (prompt PLEN + completions CLEN tokens, no padding anywhere) and `hh`
(the long-tailed HH-RLHF-like log-normal lengths of the project's GPU DPO reference script, seed 0).
Figures: mean step time over the steps after `--warmup`, pairs/s, real (unpadded) tokens/s, MFU
(6N FLOPs per real token with a live reference forward, 4N without: the reference script's
convention), peak memory, the token positions each mode actually runs through the decoder per step
(`computed_tokens`; TRL: padding included, live reference twice), and the ratios of the seqdpo modes
to trl, trl_pre and the earlier seqdpo modes of the repeat. With `--repeats N` every mode runs N
times, interleaved, and the summary rows hold medians (ratios: the median of each repeat's own
ratio). Prints a table, writes JSON.

  GPU: python bench/bench_dpo.py --shape 8b --out bench.json
  CPU: python bench/bench_dpo.py --shape small --steps 6 --out bench_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # Llama-3.1-8B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=16384),
    "mini": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS = 790e12  # measured bf16 dense matmul rate of the H100/H200 class (docs/baseline.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="trl,trl_pre,seqdpo,seqdpo_shared,eval,eval_shared")
    p.add_argument("--repeats", type=int, default=1, help="runs of every mode (interleaved); medians reported")
    p.add_argument("--lendist", default="equal,hh")
    p.add_argument("--bs", type=int, default=4, help="preference pairs per step (all modes)")
    p.add_argument("--seq-bs", type=int, default=None, help="pairs per step for seqdpo (default --bs)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the mean")
    p.add_argument("--plen", type=int, default=256)
    p.add_argument("--clen", type=int, default=256)
    p.add_argument("--hh-scale", type=float, default=1.0, help="scales the hh medians and caps (tiny CPU runs)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--eval-pairs", type=int, default=64)
    p.add_argument("--eval-bs", type=int, default=16)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data


def make_pairs(n: int, lendist: str, vocab_size: int, args):
    """The reference script's generator: same seed, same words, same lengths."""
    from datasets import Dataset

    rnd = random.Random(0)
    hi = min(120000, vocab_size - 3)

    def words(k):
        return " ".join(f"w{rnd.randrange(10, hi)}" for _ in range(k))

    if lendist == "hh":
        s = args.hh_scale

        def ln(med, cap, lo):
            return max(lo, min(int(cap * s), int(rnd.lognormvariate(math.log(med * s), 0.8))))

        pl = [ln(120, 768, 8) for _ in range(n)]
        cl = [ln(80, 256, 4) for _ in range(n)]
        rl = [ln(80, 256, 4) for _ in range(n)]
    else:
        pl, cl, rl = [args.plen] * n, [args.clen] * n, [args.clen] * n
    return Dataset.from_dict(
        {
            "pair_id": [f"b{i}" for i in range(n)],
            "prompt": [words(k) for k in pl],
            "chosen": [" " + words(k - 1) for k in cl],
            "rejected": [" " + words(k - 1) for k in rl],
        }
    )


# ---------------------------------------------------------------------------------------------- model


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model, cfg


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None


def dpo_args(args, bs, **kw):
    from trl import DPOConfig

    return DPOConfig(
        output_dir="/tmp/bench_dpo_out", per_device_train_batch_size=bs, max_steps=args.steps, learning_rate=5e-5,
        beta=0.3, bf16=args.device == "cuda", use_cpu=args.device == "cpu", logging_steps=1, report_to="none",
        save_strategy="no", max_length=args.max_length, gradient_checkpointing=False, dataloader_num_workers=0,
        warmup_steps=0, lr_scheduler_type="constant", **kw,
    )


def sequential(cls):
    """The trainer class with a sequential sampler: every mode sees the same pairs in the same order."""
    from torch.utils.data import SequentialSampler

    class Sequential(cls):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    return Sequential


def step_timer(device, times):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

    return Timer()


def autocast(device):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- modes


def run_trl(model, tok, ds, args, precompute: bool):
    from trl import DPOTrainer

    times = []
    sync(args.device)
    t = time.perf_counter()
    # with precompute_ref_log_probs TRL 1.16 runs the reference pass (and hashes the model) in __init__
    tr = sequential(DPOTrainer)(
        model=model, args=dpo_args(args, args.bs, precompute_ref_log_probs=precompute), train_dataset=ds,
        processing_class=tok, peft_config=lora_config(),
    )
    sync(args.device)
    pre_s = time.perf_counter() - t if precompute else None
    tr.add_callback(step_timer(args.device, times))
    tr.train()
    peft_model = tr.model
    del tr
    return times, pre_s, peft_model


def run_seqdpo(model, tok, tds, args, packing: str):
    from peft import get_peft_model

    from seqdpo.config import LossConfig
    from seqdpo.refcache import reference_logps, with_reference_columns
    from seqdpo.trainer import SeqDPOTrainer

    bs = args.seq_bs or args.bs
    peft_model = get_peft_model(model, lora_config())
    sync(args.device)
    t = time.perf_counter()
    with autocast(args.device):
        # a fresh cache directory: the pass is timed every run, never served from an earlier one
        ref = reference_logps(peft_model, tds, fingerprint=f"bench-{args.shape}-{args.layers}",
                              cache_dir=tempfile.mkdtemp(prefix="bench_refcache_"), batch_size=16,
                              max_length=args.max_length, packing=packing)
    sync(args.device)
    ref_s = time.perf_counter() - t
    train = with_reference_columns(tds, ref)
    times = []
    tr = sequential(SeqDPOTrainer)(
        model=peft_model, args=dpo_args(args, bs), train_dataset=train, processing_class=tok, loss=LossConfig(),
        packing=packing,
    )
    tr.add_callback(step_timer(args.device, times))
    tr.train()
    del tr
    return times, ref_s, peft_model, bs


def vs_padded(peft_model, tds, device, packing: str, n=4):
    """Max |layout - padded| log-prob on the first pairs: the layout's mask (derived from position_ids
    for pair, built by seqdpo.packing for shared_prompt) must give the padded result here."""
    from seqdpo.logprobs import PairCollator, sequence_logps

    feats = [tds[i] for i in range(n)]
    with torch.no_grad(), autocast(device):
        a = sequence_logps(peft_model, PairCollator(packing=packing)(feats))
        b = sequence_logps(peft_model, PairCollator(packing="padded")(feats))
    return max(
        (a["chosen_logps"] - b["chosen_logps"]).abs().max().item(),
        (a["rejected_logps"] - b["rejected_logps"]).abs().max().item(),
    ), a["chosen_logps"].abs().mean().item()


def computed_tokens(tds, bs: int, packing: str, max_length: int) -> list[int]:
    """Token positions one forward of each batch runs through the decoder: padded rows for TRL (every
    sequence padded to the longest of its batch), the packed row for the seqdpo layouts."""
    from seqdpo.packing import pair_num_tokens

    rows = [tds[i] for i in range(len(tds))]
    out = []
    for start in range(0, len(rows) - bs + 1, bs):
        batch = rows[start : start + bs]
        if packing == "padded":
            width = max(min(len(r["prompt_ids"]) + len(r[k]), max_length) for r in batch for k in ("chosen_ids", "rejected_ids"))
            out.append(2 * bs * width)
        else:
            out.append(sum(pair_num_tokens(r, packing) for r in batch))
    return out


def unload(peft_model):
    base = peft_model.unload()
    reset_memory("cuda" if next(base.parameters()).is_cuda else "cpu")
    return base


# ---------------------------------------------------------------------------------------------- main


SEQDPO_PACKING = {"seqdpo_chunked": "pair", "seqdpo": "pair", "seqdpo_shared": "shared_prompt", "eval": "pair",
                  "eval_shared": "shared_prompt"}
BASELINES = ("trl", "trl_pre", "seqdpo_chunked", "seqdpo")  # what the later modes of a repeat are compared with


def summarise(mode, lendist, times, bs, tok_lens, comp_tokens, args, n_params, live_ref, extra=None):
    """tok_lens: real tokens of each pair (prompt counted twice), in the order steps consume them;
    comp_tokens: positions each step's forward computes (`computed_tokens`)."""
    w = args.warmup
    timed = times[w:]
    steps = len(timed)
    tokens = sum(tok_lens[w * bs : (w + steps) * bs])
    total = sum(timed)
    rec = {
        "mode": mode, "lendist": lendist, "bs_pairs": bs, "steps_timed": steps,
        "mean_step_s": round(total / steps, 4),
        "pairs_per_s": round(bs * steps / total, 3),
        "tokens_per_s": round(tokens / total),
        "computed_tokens_per_step": round(sum(comp_tokens[w : w + steps]) / steps, 1),
        "mfu": round(tokens * n_params * (6 if live_ref else 4) / total / PEAK_FLOPS, 3) if args.device == "cuda" else None,
        "peak_mem_gib": peak_gib(args.device),
    }
    rec.update(extra or {})
    return rec


def run_mode(mode, model, tok, ds, tds, tok_lens, lendist, args, n_params):
    """One timed run of `mode`; returns its record and the PeftModel to unload."""
    from seqdpo.logprobs import dataset_logps

    if mode in ("trl", "trl_pre"):
        times, pre_s, pm = run_trl(model, tok, ds, args, precompute=mode == "trl_pre")
        extra = {"ref_pass_s": round(pre_s, 2)} if pre_s is not None else {}
        comp = computed_tokens(tds, args.bs, "padded", args.max_length)
        return summarise(mode, lendist, times, args.bs, tok_lens, comp, args, n_params, mode == "trl", extra), pm
    packing = SEQDPO_PACKING[mode]
    if mode in ("seqdpo_chunked", "seqdpo", "seqdpo_shared"):
        from seqdpo import logprobs

        logprobs.CHUNKED_LM_HEAD_ON_CPU = mode == "seqdpo_chunked"
        try:
            times, ref_s, pm, bs = run_seqdpo(model, tok, tds, args, packing)
            diff, scale = vs_padded(pm, tds, args.device, packing)
        finally:
            logprobs.CHUNKED_LM_HEAD_ON_CPU = False
        extra = {"packing": packing, "ref_pass_s": round(ref_s, 2), "ref_pairs_per_s": round(len(tds) / ref_s, 2),
                 "vs_padded_max_abs": diff, "mean_abs_logp": round(scale, 2)}
        comp = computed_tokens(tds, bs, packing, args.max_length)
        return summarise(mode, lendist, times, bs, tok_lens, comp, args, n_params, False, extra), pm
    from peft import get_peft_model

    pm = get_peft_model(model, lora_config())
    n = min(args.eval_pairs, len(tds))
    sub = tds.select(range(n))
    with autocast(args.device):
        dataset_logps(pm, sub.select(range(min(4, n))), args.eval_bs, "warmup", packing=packing, show_progress=False)
        sync(args.device)
        t = time.perf_counter()
        dataset_logps(pm, sub, args.eval_bs, "eval", packing=packing, show_progress=False)
        sync(args.device)
    el = time.perf_counter() - t
    rec = {"mode": mode, "lendist": lendist, "packing": packing, "pairs": n, "bs_pairs": args.eval_bs,
           "seconds": round(el, 3), "pairs_per_s": round(n / el, 2),
           "tokens_per_s": round(sum(tok_lens[:n]) / el), "peak_mem_gib": peak_gib(args.device)}
    return rec, pm


def median_record(runs: list[dict]) -> dict:
    """The median over repeats of every number the runs share (ratios: of each repeat's own ratio)."""
    import statistics

    rec = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            rec[key] = round(statistics.median(values), 4)
    rec["repeat"] = "median"
    rec["repeats"] = len(runs)
    if "pairs_per_s" in runs[0]:
        rec["pairs_per_s_runs"] = [r["pairs_per_s"] for r in runs]
    return rec


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import peft
    import transformers
    import trl

    from seqdpo.logprobs import tokenize_pairs
    from seqdpo.modeling import build_word_tokenizer

    datasets.disable_progress_bars()
    # TRL keys its precompute cache on a sha256 of every weight copied to the CPU (minutes of device
    # time on 8B); that hash is not part of a training step, so the bench keys it on a constant.
    import trl.trainer.dpo_trainer as trl_dpo

    trl_dpo.hash_module = lambda module: "bench-dpo"
    t0 = time.time()
    model, cfg = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    tok = build_word_tokenizer(cfg.vocab_size)
    modes = args.modes.split(",")
    env = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "peft": peft.__version__, "datasets": datasets.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "shape": args.shape,
        "layers": cfg.num_hidden_layers, "params": n_params, "init_s": round(time.time() - t0, 1),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "loadavg_start": _loadavg(),
    }
    print(json.dumps(env), flush=True)
    results = []

    def emit(rec):
        results.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            env["loadavg_end"] = _loadavg()
            with open(args.out, "w") as f:
                json.dump({"env": env, "results": results}, f, indent=1)

    for lendist in args.lendist.split(","):
        n_ex = max(args.bs, args.seq_bs or 0) * (args.steps + 1)
        ds = make_pairs(n_ex, lendist, cfg.vocab_size, args)
        tds = tokenize_pairs(ds, tok, args.max_length)
        tok_lens = [2 * len(p) + len(c) + len(r) for p, c, r in zip(tds["prompt_ids"], tds["chosen_ids"], tds["rejected_ids"])]
        runs = {m: [] for m in modes}
        for rep in range(args.repeats):
            base = {}
            for mode in modes:
                if mode not in ("trl", "trl_pre", *SEQDPO_PACKING):
                    raise ValueError(f"unknown mode {mode}")
                reset_memory(args.device)
                try:
                    rec, pm = run_mode(mode, model, tok, ds, tds, tok_lens, lendist, args, n_params)
                    model = unload(pm)
                    del pm
                except torch.cuda.OutOfMemoryError as e:  # recorded, the other modes still run
                    emit({"mode": mode, "lendist": lendist, "repeat": rep, "error": f"OOM: {str(e)[:200]}"})
                    model = _strip_lora(model)
                    continue
                rec["repeat"] = rep
                if mode.startswith("seqdpo"):
                    for b, r in base.items():
                        if b != mode:
                            rec[f"x_{b}"] = round(rec["pairs_per_s"] / r["pairs_per_s"], 2)
                            rec[f"computed_vs_{b}"] = round(rec["computed_tokens_per_step"] / r["computed_tokens_per_step"], 3)
                if mode == "eval_shared" and runs.get("eval"):
                    rec["x_eval"] = round(rec["pairs_per_s"] / runs["eval"][-1]["pairs_per_s"], 2)
                if mode in BASELINES:
                    base[mode] = rec
                runs[mode].append(rec)
                emit(rec)
        if args.repeats > 1:
            for mode in modes:
                if runs[mode]:
                    emit(median_record(runs[mode]))
    print_table(results)
    return {"env": env, "results": results}


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _strip_lora(model):
    # after a failure the model may still hold LoRA layers; unwrap them so the next mode starts clean
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, LoraLayer):
                setattr(mod, cname, child.get_base_layer())
    reset_memory("cuda" if next(model.parameters()).is_cuda else "cpu")
    return model


def print_table(results):
    cols = ["lendist", "mode", "repeat", "bs_pairs", "mean_step_s", "pairs_per_s", "tokens_per_s",
            "computed_tokens_per_step", "mfu", "peak_mem_gib", "ref_pass_s", "x_trl", "x_trl_pre", "x_seqdpo_chunked",
            "x_seqdpo", "computed_vs_trl", "x_eval", "error"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
