"""Train GeoLoRA adapters data-parallel on several processes (CPU or GPU), then check that every
process ended with the same ranks and factors.

    torchrun --nproc_per_node 2 examples/ddp_train.py
    accelerate launch --multi_gpu --num_processes 2 examples/ddp_train.py

(On a machine without GPUs, ``accelerate launch --num_processes 2`` alone starts ONE process;
``--multi_gpu`` makes it start two through torchrun, which then run on the CPU with gloo. See
docs/scale-out.md.)

Why this works: DDP averages ``U.grad``, ``S.grad`` and ``V.grad`` over the processes. They hold
``G_K = G V``, ``G_S = Uᵀ G V`` and ``G_L = Gᵀ U``, linear in the loss gradient ``G``, so the
average is the global-batch gradient. Every process then runs the same QR, SVD and rank rule on
identical inputs and takes the same rank decision; the factor tensors have a fixed size
(``r_max`` columns), so DDP's buckets never change.

The task is synthetic (a tiny BERT built from a config learns whether the first token is in the
lower half of the vocabulary), so the script runs offline in seconds.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model

VOCAB = 64


def build_model(seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
    )
    adapters = GeoLoRAConfig(
        target_modules=["query", "value", "dense"],
        r=2,
        r_max=8,
        tau=0.1,
        modules_to_save=["classifier"],
    )
    return get_geolora_model(BertForSequenceClassification(config), adapters)


def dataset(size: int = 512, seq_len: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (size, seq_len), generator=g)
    return TensorDataset(ids, (ids[:, 0] < VOCAB // 2).long())


def fingerprint(model: torch.nn.Module) -> list[tuple[str, int, float]]:
    """``(name, rank, Σ|U S Vᵀ|)`` per adapter, to compare processes."""
    return [
        (
            name.removeprefix("module."),
            layer.current_rank,
            float(layer.delta_weight().detach().abs().sum()),
        )
        for name, layer in geolora_layers(model).items()
    ]


def train_torch(args: argparse.Namespace) -> tuple[torch.nn.Module, list[float]]:
    """Plain torch: ``init_process_group`` from the launcher's environment, DDP, a sampler."""
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    # Seeds differ on purpose: DDP broadcasts rank 0's parameters (factors included) at wrap time.
    model = DistributedDataParallel(build_model(seed=rank).to(device).train())
    optimizer = GeoLoRAOptimizer(model, lr=args.lr)
    data = dataset()
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    losses = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for ids, labels in loader:
            loss = F.cross_entropy(model(input_ids=ids.to(device)).logits, labels.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model, losses


def train_accelerate(args: argparse.Namespace) -> tuple[torch.nn.Module, list[float]]:
    """accelerate: ``prepare`` wraps the model in DDP and the optimizer in AcceleratedOptimizer."""
    from accelerate import Accelerator

    # Without cpu=True, accelerate on a GPU-less machine ignores the process group (no DDP).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = build_model(seed=accelerator.process_index).train()
    optimizer = GeoLoRAOptimizer(model, lr=args.lr)
    loader = DataLoader(dataset(), batch_size=args.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(args.epochs):
        for ids, labels in loader:
            loss = F.cross_entropy(model(input_ids=ids).logits, labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--launcher",
        choices=["auto", "torch", "accelerate"],
        default="auto",
        help="auto: the accelerate API under `accelerate launch`, plain torch otherwise",
    )
    args = parser.parse_args()
    use_accelerate = args.launcher == "accelerate" or (
        args.launcher == "auto" and "ACCELERATE_MIXED_PRECISION" in os.environ
    )
    if "WORLD_SIZE" not in os.environ and not use_accelerate:
        parser.error("start this script with torchrun or accelerate launch (see its docstring).")
    model, losses = (train_accelerate if use_accelerate else train_torch)(args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    prints = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(prints, fingerprint(model))
    else:
        prints = [fingerprint(model)]
    if not dist.is_initialized() or dist.get_rank() == 0:
        api = "accelerate" if use_accelerate else "torch DDP"
        same = all(p == prints[0] for p in prints)
        print(f"{api}, {world} process(es), {len(losses)} steps each")
        k = max(1, len(losses) // args.epochs)
        print(f"mean loss: first epoch {sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f}")
        print(f"ranks: { {name: r for name, r, _ in prints[0]} }")
        print(f"ranks and factors identical on all processes: {same}")
        if not same:
            raise SystemExit("processes diverged: " + repr(prints))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
