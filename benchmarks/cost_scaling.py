"""How GeoLoRA's per-step overhead over LoRA grows with layer width (256 … 4096) and with the
number of adapted layers, on synthetic stacks of square ``nn.Linear`` layers (``y = tanh(W x)``
per layer, MSE to a random target, ``tokens`` input rows per step).

Both methods at rank 8 (GeoLoRA: r = 8, r_max = 32, ``freeze_ranks_after=0``, so every step
runs the full QR/SVD at 2r and truncates back to 8; LoRA: peft r = 8, AdamW), timed interleaved,
median of ``reps`` steps after one warm-up step. The overhead is the difference of the medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import common
import minilm
import torch
from torch import nn

NAME = "cost_scaling"
WIDTHS = (256, 512, 1024, 2048, 4096)
DEPTHS = (2, 8, 32)
TOKENS = 256
TARGET = r"layers\.\d+"


class Stack(nn.Module):
    """``depth`` square Linear layers of size ``width`` with tanh in between."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _optimizers(width: int, depth: int) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    from peft import LoraConfig, get_peft_model

    from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

    torch.manual_seed(0)
    base = Stack(width, depth)
    lora = get_peft_model(
        Stack(width, depth), LoraConfig(r=8, lora_alpha=16, target_modules=TARGET)
    )
    lora.load_state_dict(base.state_dict(), strict=False)
    geo = get_geolora_model(
        base, GeoLoRAConfig(target_modules=TARGET, r=8, r_max=32, freeze_ranks_after=0)
    )
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    return {
        "GeoLoRA": (geo, GeoLoRAOptimizer(geo, lr=1e-3)),
        "LoRA": (lora, torch.optim.AdamW(lora_params, lr=1e-3)),
    }


def measure(width: int, depth: int, tokens: int, reps: int) -> dict[str, float]:
    """Median step times (s) of GeoLoRA and LoRA on one stack, interleaved."""
    models = _optimizers(width, depth)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, width, generator=gen)
    y = torch.randn(tokens, width, generator=gen)
    times: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(reps + 1):
        for label, (model, opt) in models.items():
            t = time.perf_counter()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep:
                times[label].append(time.perf_counter() - t)
    geo, lora = (statistics.median(times[k]) for k in ("GeoLoRA", "LoRA"))
    return {
        "width": width,
        "depth": depth,
        "geolora_s": geo,
        "lora_s": lora,
        "overhead_s": geo - lora,
        "ratio": geo / lora,
    }


def _rows(results: list[dict[str, float]]) -> list[str]:
    lines = [
        "| width | layers | LoRA step (ms) | GeoLoRA step (ms) | overhead (ms) | "
        "overhead per layer (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['width']} | {r['depth']} | {1e3 * r['lora_s']:.1f} | "
            f"{1e3 * r['geolora_s']:.1f} | {1e3 * r['overhead_s']:.1f} | "
            f"{1e3 * r['overhead_s'] / r['depth']:.2f} | {r['ratio']:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(minilm.THREADS)
    widths, depths, reps, tokens = (
        ((256,), (2,), 2, 32) if args.smoke else (WIDTHS, DEPTHS, 7, TOKENS)
    )
    by_width = [measure(w, 4 if not args.smoke else 2, tokens, reps) for w in widths]
    by_depth = [measure(384, d, tokens, reps) for d in depths]
    lines = [
        f"{tokens} tokens per step, rank 8, {minilm.THREADS} CPU thread(s), median of {reps} "
        "interleaved steps.",
        "",
        "By width (4 layers):",
        "",
        *_rows(by_width),
        "",
        "By number of adapted layers (width 384, as MiniLM):",
        "",
        *_rows(by_depth),
    ]
    payload = {"tokens": tokens, "reps": reps, "by_width": by_width, "by_depth": by_depth}
    common.publish(NAME, "Overhead vs width and depth", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
