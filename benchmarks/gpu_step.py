"""Time per optimizer step on one CUDA GPU: GeoLoRA vs peft LoRA r=8 vs peft AdaLoRA, and the
number of CUDA kernel launches of GeoLoRA's geometric step as the number of same-shape layers
grows.

* Step time: forward + backward + ``optimizer.step()`` (+ AdaLoRA's ``update_and_allocate``) +
  ``zero_grad``, timed with CUDA synchronisation, the three methods interleaved step by step
  (median over ``--steps`` after ``--warmup``), on (a) SmolLM2-135M-Instruct in bfloat16
  (adapters on q, k, v, o, gate, up, down; batch 8 × 256 tokens of the embedded sentiment
  instructions, answer-only loss) and (b) a DeBERTa-v3-base-sized config (hidden 768, 12 layers,
  randomly initialised, sequence classification; adapters on query/key/value projections and
  dense; batch 32 × 128 random tokens). The methods are those of :mod:`llm_methods` (same
  ranks, learning rates, AdamW for peft). Target: GeoLoRA ≤ 1.10 × LoRA.
* Kernel launches: ``L`` stacked ``nn.Linear(1024, 1024)`` layers with GeoLoRA adapters (r = 8,
  r_max = 32), one forward/backward, then ``torch.profiler`` counts the CUDA kernels launched by
  one ``optimizer.step()``, for L = 1, 2, 4, … 64. The step batches same-shape layers, so the
  count should stay flat in L.

Needs a CUDA GPU: without one it refuses with exit status 2 and measures nothing. Run on a
device machine with ``python benchmarks/gpu_step.py`` (a few minutes; ``--smoke`` for a
sub-minute check).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import llm_methods
import torch
from torch import nn

NAME = "gpu_step"


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu_step.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"here (torch {torch.__version__}); nothing measured. Run it on a machine with one "
            "NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _timed(trainers: dict[str, Any], batch: dict, steps: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(warmup + steps):
        for name, trainer in trainers.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.step(batch, lr=1e-4)
            torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from geolora.app.causal_lm import encode_chats, sentiment_instructions
    from geolora.app.models import DEFAULT_LLM, load_causal_lm, resolve_model

    model_dir = resolve_model(DEFAULT_LLM)
    _, tokenizer = load_causal_lm(model_dir)
    chats, _ = sentiment_instructions(0.5, 0, 2 * args.batch)
    data = encode_chats(tokenizer, chats, 256)
    batch = {k: v.cuda() for k, v in data.batch(list(range(args.batch))).items()}
    trainers = {}
    for method in llm_methods.METHODS:
        total = args.warmup + args.steps + 10
        trainers[method] = llm_methods.build(
            method, model_dir, total, device="cuda", dtype=torch.bfloat16
        )
    return _timed(trainers, batch, args.steps, args.warmup)


def _deberta(args: argparse.Namespace) -> dict[str, Any]:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

    config = DebertaV2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        vocab_size=128100, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, pos_att_type=["p2c", "c2p"], num_labels=2,
    )  # fmt: skip
    targets = ["query_proj", "key_proj", "value_proj", "dense"]
    total = args.warmup + args.steps + 10
    batch = {
        "input_ids": torch.randint(0, 128100, (32, 128), device="cuda"),
        "labels": torch.randint(0, 2, (32,), device="cuda"),
    }
    trainers = {}
    for method in llm_methods.METHODS:
        torch.manual_seed(0)
        model = DebertaV2ForSequenceClassification(config).cuda()
        if method == "geolora":
            get_geolora_model(
                model, GeoLoRAConfig(target_modules=targets, modules_to_save=["classifier"])
            )
            optimizer: Any = GeoLoRAOptimizer(model, lr=1e-4)
        else:
            kind = LoraConfig if method == "lora" else AdaLoraConfig
            extra = (
                {"r": 8}
                if method == "lora"
                else {"init_r": 12, "target_r": 8, "total_step": total, "tinit": 1, "tfinal": 1}
            )
            model = get_peft_model(
                model,
                kind(
                    lora_alpha=16, target_modules=targets, modules_to_save=["classifier"], **extra
                ),
            )
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        trainers[method] = llm_methods.MethodTrainer(method, model, optimizer)
    return _timed(trainers, batch, args.steps, args.warmup)


def _kernel_launches(layers: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(layers))).cuda()
    get_geolora_model(model, GeoLoRAConfig(target_modules="all-linear", r=8, r_max=32))
    optimizer = GeoLoRAOptimizer(model, lr=1e-3)
    x = torch.randn(64, 1024, device="cuda")
    for _ in range(2):  # warm up (lazy state, cuBLAS/cuSOLVER handles)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer.step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type.name == "CUDA")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="SmolLM2 batch")
    parser.add_argument("--smoke", action="store_true", help="few steps, L up to 8")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    _require_cuda()
    if args.smoke:
        args.steps, args.warmup = 3, 1
    sizes = [1, 2, 4, 8] if args.smoke else [1, 2, 4, 8, 16, 32, 64]
    payload: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    payload["smollm2_bf16_step_s"] = _smollm2(args)
    payload["deberta_base_step_s"] = _deberta(args)
    payload["kernel_launches"] = {str(n): _kernel_launches(n) for n in sizes}
    lines = [f"{payload['device']}, torch {torch.__version__}; median of {args.steps} steps.", ""]
    lines += [
        "| model | GeoLoRA (ms) | LoRA (ms) | AdaLoRA (ms) | GeoLoRA / LoRA |",
        "|---|---|---|---|---|",
    ]
    for label, key in (
        ("SmolLM2-135M bf16", "smollm2_bf16_step_s"),
        ("DeBERTa-base size", "deberta_base_step_s"),
    ):
        t = payload[key]
        lines.append(
            f"| {label} | {t['geolora'] * 1e3:.1f} | {t['lora'] * 1e3:.1f} | "
            f"{t['adalora'] * 1e3:.1f} | {t['geolora'] / t['lora']:.3f} |"
        )
    lines += ["", "| same-shape layers L | CUDA kernels in one optimizer.step() |", "|---|---|"]
    lines += [f"| {n} | {k} |" for n, k in payload["kernel_launches"].items()]
    cmd = "python benchmarks/gpu_step.py" + (" --smoke" if args.smoke else "")
    common.write_table(NAME, cmd, "GPU step time and kernel launches", lines, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
