"""GeoLoRA under torch DDP: 2 processes, gloo, CPU.

DDP all-reduces (averages) ``U.grad``, ``S.grad`` and ``V.grad``, which hold ``G_K``, ``G_S`` and
``G_L``: all three are linear in the loss gradient, so the average over processes equals the
gradient of the global-batch mean loss. Every process then runs the same deterministic QR, SVD
and rank decision on identical inputs, so the factors and ranks must stay identical across
processes and equal to a single-process run on the global batch.

The rendezvous store is a ``TCPStore`` that this (parent) process opens on port 0, so the OS
picks a free localhost port and no other test can take it in between.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD_SIZE = 2
STEPS = 30
LOCAL_BATCH = 8
IN_FEATURES = 12
CLASSES = 3
R_INIT = 2


class _TinyNet(torch.nn.Module):
    """A two-block MLP classifier in float64 (rounding then cannot flip a rank decision)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(IN_FEATURES, 32)
        self.hidden = torch.nn.Linear(32, 24)
        self.head = torch.nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.embed(x)))))


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GeoLoRAConfig(
        target_modules=["embed", "hidden"], r=R_INIT, r_max=8, tau=0.1, modules_to_save=["head"]
    )
    return get_geolora_model(_TinyNet().double(), config).train()


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, IN_FEATURES, generator=g, dtype=torch.float64)
    labels = (x[:, :CLASSES] @ torch.arange(1.0, 1.0 + CLASSES, dtype=torch.float64)).long()
    return x, labels % CLASSES


def _train(model: torch.nn.Module, rank: int, world_size: int) -> None:
    optimizer = GeoLoRAOptimizer(model, lr=3e-2, base_rule="adam")
    per_rank = WORLD_SIZE * LOCAL_BATCH // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(STEPS):
        x, labels = _global_batch(step)
        loss = F.cross_entropy(model(x[part]), labels[part])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Active factors and rank of every adapter (names without the ``module.`` prefix)."""
    out = {}
    for name, layer in geolora_layers(model).items():
        name = name.removeprefix("module.")
        u, s, v = (t.detach().clone() for t in layer.active_factors())
        out.update({f"{name}.U": u, f"{name}.S": s, f"{name}.V": v})
        out[f"{name}.rank"] = torch.tensor(layer.current_rank)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP process; rank 1 starts from another seed, DDP's initial broadcast must fix it."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        ddp = DistributedDataParallel(_model(seed=rank))
        _train(ddp, rank, WORLD_SIZE)
        torch.save(_snapshot(ddp), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_snapshots(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ddp")
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.start_processes(
            _worker, args=(server.port, str(out_dir)), nprocs=WORLD_SIZE, start_method="spawn"
        )
    finally:
        del server
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_ranks_and_factors_identical_across_processes(ddp_snapshots):
    first, second = ddp_snapshots
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].shape == second[key].shape, key
        assert float((first[key] - second[key]).abs().max()) <= 1e-6, key
    ranks = [int(v) for k, v in first.items() if k.endswith(".rank")]
    assert any(r != R_INIT for r in ranks), "no rank moved: the test would not test decisions"


def test_ddp_equals_single_process_on_global_batch(ddp_snapshots):
    model = _model(seed=0)
    _train(model, rank=0, world_size=1)
    single = _snapshot(model)
    assert single.keys() == ddp_snapshots[0].keys()
    for key, value in single.items():
        other = ddp_snapshots[0][key]
        assert value.shape == other.shape, key
        assert float((value - other).abs().max()) <= 1e-4, key
