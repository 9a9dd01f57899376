"""Cost per step (issue 2 "Measure", issue 5 item 6): GeoLoRA against peft LoRA at equal rank and
peft AdaLoRA on the full all-MiniLM-L6-v2 (adapters on query and value of all 6 layers), same
batch and threads, timed interleaved step by step in one process (median of many steps).

* A step is forward + backward + ``optimizer.step()`` (+ AdaLoRA's ``update_and_allocate``) +
  ``zero_grad``. Target (issue 9): GeoLoRA ≤ 1.05 × LoRA at 1 thread **and** at 2 threads (both
  measured in this one run, the thread count set before each block of rounds), and below AdaLoRA.
* GeoLoRA at equal rank: r = 8 with ``freeze_ranks_after=0`` (the full geometric step still runs:
  QR of ``[U | D]`` at 2r columns, SVD of the 2r × 2r ``Ŝ``, then truncation back to 8). GeoLoRA
  with the defaults: the library's defaults, ranks free (they move during the timed rounds; the
  table gives the total rank at the end). LoRA r = 8; AdaLoRA init_r = 8 → target_r = 4 kept
  inside its budgeting phase (importance scores and masking every step, its costliest phase).
* The thread switch: GeoLoRAOptimizer runs its geometric step on one CPU thread and sets the
  thread count back afterwards; its cost is timed alone (``torch.set_num_threads(1)`` and back)
  and in its effect on the rest of the step: a second LoRA r = 8 model that makes the same
  switch after each of its optimizer steps runs in the same interleaved rounds
  ("LoRA + thread switch"), so a slower next forward (OpenMP threads waking up) would show.
* The geometric step's share and its breakdown (QR, SVD, base rule and state transport,
  assembly/truncation) come from ``cProfile`` of ``GeoLoRAOptimizer.step``.
* Batched vs looped QR/SVD: the 12 adapters share one shape; the optimizer stacks them.
* Memory of the fixed ``r_max`` storage: bytes of U, S, V, their grads and the Adam state at
  ``r_max`` against the same at the current rank (peak process memory is not measured on CPU).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from typing import Any

import common
import methods
import minilm
import torch

NAME = "step_overhead"
TARGETS = ["query", "value"]
CATEGORIES = {
    "QR": ("linalg_qr",),
    "SVD": ("linalg_svd",),
    "base rule + state transport": ("base_rules.py",),
    "assembly + truncation": ("integrator.py", "layers.py"),
}


PEFT_METHODS = {
    "LoRA": ("lora", {"lr": 1e-3, "r": 8}),
    "AdaLoRA": (
        "adalora",
        {"lr": 1e-3, "init_r": 8, "target_r": 4, "tinit_frac": 0.0, "tfinal_frac": 0.0},
    ),
}


def _prepared() -> dict[str, methods.Prepared]:
    from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

    out = {}
    for label, extra in (("GeoLoRA", {"freeze_ranks_after": 0}), ("GeoLoRA defaults", {})):
        torch.manual_seed(0)
        cfg = GeoLoRAConfig(target_modules=TARGETS, modules_to_save=["classifier"], **extra)
        model = get_geolora_model(minilm.load_model(), cfg)
        out[label] = methods.Prepared("geolora", model, GeoLoRAOptimizer(model))
    for label, (method, hyper) in PEFT_METHODS.items():
        torch.manual_seed(0)
        out[label] = methods.prepare(method, hyper, minilm.load_model(), 1000, TARGETS)
    torch.manual_seed(0)
    lora_hyper = PEFT_METHODS["LoRA"][1]
    out[SWITCHING] = methods.prepare("lora", lora_hyper, minilm.load_model(), 1000, TARGETS)
    for prep in out.values():
        prep.model.train()
    return out


THREAD_COUNTS = (1, 2)
SWITCHING = "LoRA + thread switch"
GEOLORA_LABELS = ("GeoLoRA", "GeoLoRA defaults")


def _interleaved(preps, enc, labels, rounds: int, threads: int):
    """Seconds per step and per optimizer step of every method, interleaved round by round
    (rotating the order) at ``threads`` torch threads, after two warm-up rounds."""
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in preps}
    opt_times: dict[str, list[float]] = {k: [] for k in preps}
    order = list(preps)
    for step in range(rounds + 2):
        shift = step % len(order)
        for label in order[shift:] + order[:shift]:
            prep = preps[label]
            t0 = time.perf_counter()
            out = prep.model(**enc, labels=labels)
            out.loss.backward()
            t1 = time.perf_counter()
            prep.optimizer.step()
            if label == SWITCHING:
                torch.set_num_threads(1)
                torch.set_num_threads(threads)
            if prep.method == "adalora":
                prep.model.base_model.update_and_allocate(prep.step)
            prep.optimizer.zero_grad(set_to_none=True)
            prep.step += 1
            t2 = time.perf_counter()
            if step >= 2:  # two warm-up rounds
                times[label].append(t2 - t0)
                opt_times[label].append(t2 - t1)
    return times, opt_times


def _thread_switch_cost(reps: int) -> float:
    """Median seconds of one switch to one thread and back, as the optimizer does each step."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.set_num_threads(1)
        torch.set_num_threads(2)
        samples.append(time.perf_counter() - t)
    torch.set_num_threads(before)
    return statistics.median(samples)


def _profile_geometric(prep: methods.Prepared, batch, labels, steps: int) -> dict[str, float]:
    """Seconds per ``optimizer.step()`` by category (cProfile ``tottime``)."""
    prof = cProfile.Profile()
    for _ in range(steps):
        out = prep.model(**batch, labels=labels)
        out.loss.backward()
        prof.enable()
        prep.optimizer.step()
        prof.disable()
        prep.optimizer.zero_grad()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    parts = {k: 0.0 for k in CATEGORIES}
    for (filename, _, func), v in stats.items():
        for cat, keys in CATEGORIES.items():
            if any(k in func or filename.endswith(k) for k in keys):
                parts[cat] += v[2]
                break
    parts["other (Python, bookkeeping)"] = total - sum(parts.values())
    return {k: v / steps for k, v in parts.items()} | {"total": total / steps}


def _batched_vs_loop(layers: int, n: int, r: int, reps: int, threads: int) -> dict[str, float]:
    """Median seconds of QR of ``layers`` (n × 2r) blocks and SVD of (2r × 2r) blocks, stacked
    in one call against one call per layer, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a = torch.randn(layers, n, 2 * r)
    s = torch.randn(layers, 2 * r, 2 * r)
    res: dict[str, list[float]] = {
        "qr batched": [],
        "qr loop": [],
        "svd batched": [],
        "svd loop": [],
    }
    for _ in range(reps):
        for name, fn in (("qr", torch.linalg.qr), ("svd", torch.linalg.svd)):
            x = a if name == "qr" else s
            t = time.perf_counter()
            fn(x)
            res[f"{name} batched"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(layers):
                fn(x[i])
            res[f"{name} loop"].append(time.perf_counter() - t)
    torch.set_num_threads(minilm.THREADS)
    return {k: statistics.median(v) for k, v in res.items()}


def _thread_effect(prep: methods.Prepared, batch, labels, rounds: int) -> dict[str, float]:
    """Median seconds of GeoLoRA's ``optimizer.step()`` at 2 torch threads: as shipped (the
    geometric step runs on one thread) against the same step with 2 threads throughout."""
    opt = prep.optimizer
    torch.set_num_threads(2)
    res: dict[str, list[float]] = {"one-thread geometric step": [], "2 threads throughout": []}
    for rep in range(rounds + 1):
        for mode, times in res.items():
            prep.model(**batch, labels=labels).loss.backward()
            t = time.perf_counter()
            if mode == "2 threads throughout":
                with torch.no_grad():
                    for group in opt.param_groups:
                        (opt._geometric_step if group["geolora"] else opt._adamw_step)(group)
            else:
                opt.step()
            if rep:
                times.append(time.perf_counter() - t)
            opt.zero_grad(set_to_none=True)
    torch.set_num_threads(minilm.THREADS)
    return {k: statistics.median(v) for k, v in res.items()}


def _memory(prep: methods.Prepared) -> dict[str, int]:
    """Bytes of factors + grads + optimizer state: stored (r_max) vs needed at the current rank."""
    from geolora import geolora_layers

    stored = needed = 0
    for layer in geolora_layers(prep.model).values():
        r, r_max = layer.current_rank, layer.S.shape[0]
        state = prep.optimizer.state[layer.U]
        tensors = [layer.U, layer.S, layer.V] + [
            p.grad for p in (layer.U, layer.S, layer.V) if p.grad is not None
        ]
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() == 2]
        stored += sum(t.numel() * t.element_size() for t in tensors)
        for t in tensors:  # active part: r of the r_max columns, and of the core's r_max rows
            rows = r if t.shape[0] == r_max else t.shape[0]
            needed += rows * min(r, t.shape[1]) * t.element_size()
    return {"stored_r_max": stored, "at_current_rank": needed}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(minilm.THREADS)
    batch_size, length, rounds = (4, 16, 3) if args.smoke else (16, 40, 60)
    from geolora import rank_report
    from geolora.data import load_rotten_tomatoes

    train, _ = load_rotten_tomatoes(seed=0)
    enc = minilm.tokenize(train.texts[:batch_size], length)
    labels = torch.tensor(train.labels[:batch_size])
    preps = _prepared()
    by_threads = {t: _interleaved(preps, enc, labels, rounds, t) for t in THREAD_COUNTS}
    torch.set_num_threads(minilm.THREADS)
    med = {
        t: {k: statistics.median(v) for k, v in times.items()}
        for t, (times, _) in by_threads.items()
    }
    opt_med = {
        t: {k: statistics.median(v) for k, v in o.items()} for t, (_, o) in by_threads.items()
    }
    geo = preps["GeoLoRA"]
    parts = _profile_geometric(geo, enc, labels, 2 if args.smoke else 5)
    bvl = {
        (r, threads): _batched_vs_loop(12, 384, r, 3 if args.smoke else 15, threads)
        for threads in (1, 2)
        for r in (8, 16)
    }
    mem = _memory(geo)
    small = {k: v[:8] for k, v in enc.items()}
    thread_effect = _thread_effect(geo, small, labels[:8], 2 if args.smoke else 5)
    switch_s = _thread_switch_cost(200 if not args.smoke else 5)
    default_rank = rank_report(preps["GeoLoRA defaults"].model)["total_rank"]
    ratios = {
        t: {
            f"{geo_label}/{other}": m[geo_label] / m[other]
            for geo_label in GEOLORA_LABELS
            for other in ("LoRA", "AdaLoRA")
        }
        for t, m in med.items()
    }
    met = all(r[f"{g}/LoRA"] <= 1.05 for r in ratios.values() for g in GEOLORA_LABELS)
    paired = {
        t: {
            f"{num}/{den}": statistics.quantiles(
                [x / y for x, y in zip(times[num], times[den])], n=4
            )
            for num, den in (("GeoLoRA", "LoRA"), ("GeoLoRA", "AdaLoRA"), (SWITCHING, "LoRA"))
        }
        for t, (times, _) in by_threads.items()
    }
    lines = [
        f"all-MiniLM-L6-v2 (all 6 layers), adapters on query and value, batch {batch_size} × "
        f"{length} tokens, {rounds} interleaved rounds after 2 warm-up rounds at each thread "
        f"count; GeoLoRA at equal rank 8 and with the library's defaults (total rank "
        f"{default_rank} over 12 adapters at the end), LoRA r=8, AdaLoRA 8 → 4 (see the "
        "script's docstring).",
        "",
        "| threads | method | step (median, ms) | of which optimizer step (+ allocation), ms | "
        "ratio |",
        "|---|---|---|---|---|",
    ]
    for t in THREAD_COUNTS:
        for k in preps:
            ratio = med[t][k] / med[t]["LoRA"]
            lines.append(
                f"| {t} | {k} | {1e3 * med[t][k]:.1f} | {1e3 * opt_med[t][k]:.1f} | "
                f"{ratio:.3f} × LoRA |"
            )
    lines += [
        "",
        "Ratios: "
        + "; ".join(
            f"{t} thread(s): " + ", ".join(f"{k} **{v:.3f}**" for k, v in r.items())
            for t, r in ratios.items()
        )
        + f". Target (≤ 1.05 × LoRA at 1 and 2 threads): **{'met' if met else 'missed'}**. "
        "Per-round paired ratios (GeoLoRA at equal rank), median (quartiles): "
        + "; ".join(
            f"{t} thread(s) "
            + ", ".join(f"{k} {q[1]:.3f} ({q[0]:.3f}–{q[2]:.3f})" for k, q in p.items())
            for t, p in paired.items()
        )
        + ".",
        "",
        f"The thread switch of the geometric step (``torch.set_num_threads(1)`` and back) costs "
        f"{1e6 * switch_s:.1f} µs. Its effect on the rest of the step: the LoRA model that "
        "switches after each of its steps runs at "
        + ", ".join(f"{med[t][SWITCHING] / med[t]['LoRA']:.3f} ×" for t in THREAD_COUNTS)
        + f" LoRA's step at {' and '.join(map(str, THREAD_COUNTS))} thread(s).",
        "",
    ]
    one = THREAD_COUNTS[0]
    lines += [
        f"GeoLoRA's optimizer step is {100 * opt_med[one]['GeoLoRA'] / med[one]['GeoLoRA']:.1f}% "
        f"of its step at {one} thread; its breakdown under cProfile ({1e3 * parts['total']:.1f} ms "
        "per step with the profiler's own overhead):",
        "",
        "| part of the geometric step | ms per step | share |",
        "|---|---|---|",
    ]
    for k, v in parts.items():
        if k != "total":
            lines.append(f"| {k} | {1e3 * v:.2f} | {100 * v / parts['total']:.0f}% |")
    lines += [
        "",
        "Batched (one call on the 12 stacked adapters) vs looped QR/SVD, median ms, at 1 and "
        "2 torch threads (the machine is shared: at 2 threads the threads wait on each other):",
        "",
        "| rank r | threads | QR 384 × 2r batched | looped | SVD 2r × 2r batched | looped |",
        "|---|---|---|---|---|---|",
    ]
    for (r, threads), v in bvl.items():
        lines.append(
            f"| {r} | {threads} | {1e3 * v['qr batched']:.2f} | {1e3 * v['qr loop']:.2f} | "
            f"{1e3 * v['svd batched']:.2f} | {1e3 * v['svd loop']:.2f} |"
        )
    lines += [
        "",
        "GeoLoRA's `optimizer.step()` with torch at 2 threads (median ms; batch of 8): "
        + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in thread_effect.items())
        + ". The optimizer runs its geometric step on one thread (GeoLoRAOptimizer.step).",
    ]
    lines += [
        "",
        f"Memory of factors + grads + Adam state: {mem['stored_r_max'] / 2**20:.2f} MiB "
        f"stored at r_max = 32 against {mem['at_current_rank'] / 2**20:.2f} MiB needed at the "
        f"current rank ({mem['stored_r_max'] / mem['at_current_rank']:.1f}×); the frozen "
        f"model itself is {sum(p.numel() for p in geo.model.parameters()) * 4 / 2**20:.0f} "
        "MiB.",
    ]
    payload = {
        "batch": batch_size,
        "length": length,
        "threads": list(THREAD_COUNTS),
        "rounds": rounds,
        "default_total_rank": default_rank,
        "thread_switch_s": switch_s,
        "median_step_s": med,
        "median_optimizer_s": opt_med,
        "ratios": ratios,
        "paired_ratio_quartiles": paired,
        "target_met": met,
        "geometric_breakdown_s": parts,
        "batched_vs_loop_s": {f"r={r},threads={t}": v for (r, t), v in bvl.items()},
        "memory_bytes": mem,
        "two_thread_optimizer_step_s": thread_effect,
    }
    common.publish(NAME, "Cost per step", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
