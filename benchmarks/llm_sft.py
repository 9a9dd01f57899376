"""SmolLM2-135M-Instruct fine-tuned on an instruction task: zero-shot vs GeoLoRA vs peft LoRA r=8
vs peft AdaLoRA, plus gradient checkpointing, adapter memory and a 4-bit base.

Task: the embedded Rotten Tomatoes sentences as instructions (``geolora finetune --task
causal-lm``'s default data: "Is the sentiment of this movie review positive or negative? ...
Answer with one word"), answered by greedy generation; accuracy = the first label the answer
names is the right one (:func:`geolora.app.evaluation.first_label`), exact match = the answer is
the label and nothing else. Training: one pass over ``steps × batch`` examples, the same batches
in the same order for every method (length-bucketed, :func:`geolora.app.batches.epoch_batches`),
linear warm-up (10 %) and decay, loss on the answer tokens only, clipping at 1. The three methods
(:mod:`llm_methods`) train side by side in one process, one step of each in turn, so that their
step times see the same machine load (median over the steps after the first).

Also measured, each in a process of its own (:mod:`llm_memory`): resident memory before the first
step and its peak during 3 steps, per method, for GeoLoRA with gradient checkpointing and for
GeoLoRA on a 4-bit NF4 base; the factor gradients with and without gradient checkpointing on one
batch; the bytes of GeoLoRA's factors + Adam state as stored (at r_max) and at the final ranks,
against LoRA's at the same ranks and at r = 8.

Sized for the project's shared 2-core CPU at one thread (about 30 min with the defaults).
``--smoke`` runs the same code on a tiny model for CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import llm_methods
import torch

from geolora.app.batches import epoch_batches
from geolora.app.causal_lm import encode_chats, sentiment_instructions
from geolora.app.evaluation import generate_answers, score_answers
from geolora.app.finetune import learning_rate_at
from geolora.app.models import DEFAULT_LLM, load_causal_lm, resolve_model

NAME = "llm_sft"
LABELS = ["negative", "positive"]
EARLY_STEPS = 10
"""Steps over which a run's early peak and late mean loss are taken (single 4-example batches
are noisy, so the last step's loss alone says little)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LLM, help="model id, directory or .gguf")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval", type=int, default=100, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.eval = 3, 2, 4  # AdaLoRA needs >= 3 steps
    return args


def command(name: str, args: argparse.Namespace) -> str:
    """The command line of script ``name`` with the options of ``args`` that differ from the
    defaults (threads always)."""
    cmd = common.command(name, args.smoke) + f" --threads {args.threads}"
    if args.seed != 0:
        cmd += f" --seed {args.seed}"
    if args.out != common.RESULTS:
        cmd += f" --out {args.out}"
    return cmd


def evaluate(model: torch.nn.Module, tokenizer: Any, held_out: list) -> dict[str, Any]:
    prompts = [chat[:-1] for chat in held_out]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=6)
    return {**score_answers(answers, held_out, LABELS), "samples": answers[:3]}


def _memory_runs(model_dir: str, batch: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One :mod:`llm_memory` process per configuration (in-process with ``--smoke``)."""
    import llm_memory

    configs = [
        ("geolora", []), ("lora", []), ("adalora", []),
        ("geolora", ["--checkpointing"]), ("geolora", ["--four-bit"]),
    ]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "batch.pt"
        torch.save(batch, file)
        for method, extra in configs:
            argv = ["--method", method, "--model", model_dir, "--batch", str(file)]
            argv += ["--total-steps", str(args.steps), "--threads", str(args.threads), *extra]
            if args.smoke:
                results.append(llm_memory.main(argv))
                continue
            script = Path(__file__).with_name("llm_memory.py")
            done = subprocess.run(
                [sys.executable, str(script), *argv], capture_output=True, text=True, check=True
            )
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1], file=sys.stderr, flush=True)
    return results


def _checkpointing_gradients(model_dir: str, batch: dict, steps: int) -> float:
    """Largest relative difference of the factor gradients with and without checkpointing."""
    trainer = llm_methods.build("geolora", model_dir, steps)
    model = trainer.model.train()
    grads = []
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.trainable]))
        trainer.optimizer.zero_grad(set_to_none=True)
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())


def _adapter_bytes(trainer: llm_methods.MethodTrainer) -> dict[str, int]:
    """GeoLoRA factors (U, S, V) + Adam state: as stored at r_max and as needed at the final
    ranks; LoRA's A, B + AdamW moments (3 copies of r (n + m)) at those ranks and at r = 8."""
    from geolora import geolora_layers

    stored = at_final = lora_same = lora_8 = 0
    for layer in geolora_layers(trainer.model).values():
        r, n, m, rmax = layer.current_rank, layer.out_features, layer.in_features, layer.r_max
        tensors = [layer.U, layer.S, layer.V]
        state = trainer.optimizer.state[layer.U].values()
        tensors += [t for t in state if torch.is_tensor(t) and t.dim() == 2]
        size = layer.U.element_size()
        stored += sum(t.numel() for t in tensors) * size
        at_final += (
            sum(int(torch.tensor([r if d == rmax else d for d in t.shape]).prod()) for t in tensors)
            * size
        )
        lora_same += 3 * r * (n + m) * size
        lora_8 += 3 * 8 * (n + m) * size
    return {"stored_r_max": stored, "at_final_ranks": at_final, "lora_same_ranks": lora_same,
            "lora_r8": lora_8}  # fmt: skip


DEFAULT_RUNS = {m: (m, llm_methods.LEARNING_RATES[m]) for m in llm_methods.METHODS}
"""The runs of the main table: label → (method, peak lr)."""


def prepare_task(args: argparse.Namespace) -> tuple[tuple[str, Any, list, list, Any], dict]:
    """The task for ``args`` (model, steps, batch size, eval, seed): (model directory, encoded
    training examples, the batches of the one pass, held-out chats, tokenizer), and the
    zero-shot scores of the pretrained model on the held-out chats."""
    model_dir = resolve_model(args.model)
    n_train = args.steps * args.batch_size
    train_chats, held_out = sentiment_instructions(
        args.eval / (n_train + args.eval), args.seed, n_train + args.eval
    )
    base, tokenizer = load_causal_lm(model_dir)
    train = encode_chats(tokenizer, train_chats, 256)
    batches = epoch_batches(train.lengths(), args.batch_size, args.seed, 0)[: args.steps]
    zero_shot = evaluate(base, tokenizer, held_out)
    print("zero-shot", zero_shot, file=sys.stderr, flush=True)
    return (model_dir, train, batches, held_out, tokenizer), zero_shot


def train_side_by_side(model_dir, train, batches, held_out, tokenizer, args, runs=DEFAULT_RUNS):
    """Train every run of ``runs`` (label → (method, peak lr)) on the same batches, one step of
    each in turn, evaluate each on ``held_out``; returns (results by label, trainers by label)."""
    trainers = {
        label: llm_methods.build(method, model_dir, args.steps, seed=args.seed, lr=lr)
        for label, (method, lr) in runs.items()
    }
    times: dict[str, list[float]] = {m: [] for m in trainers}
    losses: dict[str, list[float]] = {m: [] for m in trainers}
    warmup = max(1, args.steps // 10)
    for step, ids in enumerate(batches):
        batch = train.batch(ids)
        for method, trainer in trainers.items():
            lr = learning_rate_at(step, args.steps, runs[method][1], warmup)
            start = time.perf_counter()
            losses[method].append(trainer.step(batch, lr))
            times[method].append(time.perf_counter() - start)
        print(f"step {step + 1}/{args.steps}", {m: round(v[-1], 3) for m, v in losses.items()},
              file=sys.stderr, flush=True)  # fmt: skip
    results = {}
    for method, trainer in trainers.items():
        ranks = trainer.ranks()
        results[method] = {
            **evaluate(trainer.model, tokenizer, held_out),
            "trainable_params": trainer.trainable_params(),
            "total_rank": sum(ranks.values()),
            "rank_min_median_max": [
                min(ranks.values()),
                statistics.median(ranks.values()),
                max(ranks.values()),
            ],  # fmt: skip
            "step_s": statistics.median(times[method][1:] or times[method]),
            "first_loss": losses[method][0],
            "last_loss": losses[method][-1],
            "peak_early_loss": max(losses[method][:EARLY_STEPS]),
            "mean_late_loss": statistics.mean(losses[method][-EARLY_STEPS:]),
        }
        print(method, results[method], file=sys.stderr, flush=True)
    return results, trainers


def _table(payload: dict[str, Any]) -> list[str]:
    res, mem = (
        payload["methods"],
        {(m["method"], m["four_bit"], m["checkpointing"]): m for m in payload["memory"]},
    )
    lora_step = res["lora"]["step_s"]
    names = {
        "geolora": "GeoLoRA",
        "geolora-budget": "GeoLoRA, budget = LoRA r=8's params",
        "lora": "LoRA r=8",
        "adalora": "AdaLoRA",
    }
    zero = payload["zero_shot"]
    lines = [
        payload["setup"],
        "",
        "| method | accuracy | exact match | final trainable params | total rank (min / median / "
        "max) | step (s) | step / LoRA | peak memory (MiB) | training adds (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| zero-shot | {zero['accuracy']:.3f} | {zero['exact_match']:.3f} | 0 | | | | | |",
    ]
    for method, r in res.items():
        m = mem.get((method, False, False))
        peak = f"{m['peak_mib']:.0f} | {m['training_adds_mib']:.0f}" if m else "| "
        low, mid, high = r["rank_min_median_max"]
        lines.append(
            f"| {names[method]} | {r['accuracy']:.3f} | {r['exact_match']:.3f} | "
            f"{r['trainable_params']:,} | {r['total_rank']} ({low} / {mid:g} / {high}) | "
            f"{r['step_s']:.2f} | {r['step_s'] / lora_step:.3f} | {peak} |"
        )
    plain, ckpt, four = (mem[("geolora", False, False)], mem[("geolora", False, True)],
                         mem[("geolora", True, False)])  # fmt: skip
    b = payload["adapter_bytes"]
    lines += [
        "",
        "Step time and memory of GeoLoRA (each configuration in its own process, 3 steps, the "
        "same batch):",
        "",
        "| GeoLoRA on | model tensors (MiB) | resident before (MiB) | peak (MiB) | training adds "
        "(MiB) | step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in (("float32 base", plain), ("float32 base + gradient checkpointing", ckpt),
                     ("4-bit NF4 base (float32 compute)", four)):  # fmt: skip
        lines.append(
            f"| {label} | {m['model_tensors_mib']:.0f} | {m['resident_before_mib']:.0f} | "
            f"{m['peak_mib']:.0f} | "
            f"{m['training_adds_mib']:.0f} | {m['step_s']:.2f} |"
        )
    lines += [
        "",
        f"Gradient checkpointing: largest relative difference of the factor gradients with and "
        f"without it on one batch: {payload['checkpointing_grad_rel_diff']:.1e}.",
        "",
        f"Adapter memory (factors + optimizer state, float32): GeoLoRA as stored at r_max "
        f"{b['stored_r_max'] / 2**20:.1f} MiB, at its final ranks {b['at_final_ranks'] / 2**20:.1f}"
        f" MiB; LoRA (A, B + AdamW moments) at the same ranks {b['lora_same_ranks'] / 2**20:.1f} "
        f"MiB, at r = 8 {b['lora_r8'] / 2**20:.1f} MiB.",
    ]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    started = time.perf_counter()
    task, zero_shot = prepare_task(args)
    model_dir, train, batches, held_out = task[:4]
    methods, trainers = train_side_by_side(*task, args)
    adapter_bytes = _adapter_bytes(trainers["geolora"])
    del trainers
    probe = train.batch(batches[0])
    payload = {
        "setup": (
            f"{args.model} on the embedded Rotten Tomatoes sentences as instructions: "
            f"{len(train)} training examples (one pass, {args.steps} steps of {args.batch_size}), "
            f"{len(held_out)} held out, seed {args.seed}, {args.threads} CPU thread(s). "
            "Learning rates GeoLoRA 1e-3, LoRA 1e-3, AdaLoRA 3e-3 (not tuned); adapters on "
            "q, k, v, o, gate, up, down of every layer."
        ),
        "zero_shot": zero_shot,
        "methods": methods,
        "adapter_bytes": adapter_bytes,
        "checkpointing_grad_rel_diff": _checkpointing_gradients(model_dir, probe, args.steps),
        "memory": _memory_runs(model_dir, probe, args),
        "wall_s": None,
    }
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    title = "Causal-LM SFT: SmolLM2-135M-Instruct, zero-shot vs GeoLoRA vs LoRA vs AdaLoRA"
    common.write_table(NAME, command(NAME, args), title, _table(payload), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
