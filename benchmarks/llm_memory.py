"""Peak memory and step time of one fine-tuning method on a causal LM, in a process of its own.

Run by ``llm_sft.py`` (one process per configuration, so that one method's memory cannot hide
another's): loads the model, builds the method (GeoLoRA, peft LoRA r=8 or peft AdaLoRA; optionally
a 4-bit NF4 base or gradient checkpointing), runs ``--steps`` training steps on the given batch
and prints one JSON line: the resident memory before the first step (model + adapters), the
peak during the steps (sampled every 2 ms from ``/proc/self/statm``), their difference (what
training adds: activations, gradients, optimizer state), the bytes of the model's own tensors
and the median step time. A 4-bit model is quantized from the float one after loading, so the
process keeps some memory of that (freed heap, pages of the memory-mapped checkpoint file): its
resident memory falls by less than its tensors do.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakSampler:
    """Highest resident memory seen while the ``with`` block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def release_free_memory() -> None:
    """Return freed heap pages to the system, so that resident memory shows what is in use."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def model_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once), with the quantization
    constants of 4-bit layers: what the model itself needs, whatever the allocator keeps."""
    from geolora.quantized import is_4bit

    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    extra = 0
    for module in model.modules():
        if is_4bit(module):
            state = module.weight.quant_state
            extra += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
    return sum(storages.values()) + extra


def main(argv: list[str] | None = None) -> dict:
    import llm_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=llm_methods.METHODS, required=True)
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--batch", type=Path, required=True, help="torch.save'd batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--total-steps", type=int, default=30, help="AdaLoRA's schedule length")
    parser.add_argument("--four-bit", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = torch.load(args.batch)
    trainer = llm_methods.build(
        args.method, args.model, args.total_steps, four_bit=args.four_bit,
        checkpointing=args.checkpointing,
    )  # fmt: skip
    release_free_memory()
    before = resident_bytes()
    times = []
    with PeakSampler() as sampler:
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.step(batch, lr=1e-4)
            times.append(time.perf_counter() - start)
    result = {
        "method": args.method,
        "four_bit": args.four_bit,
        "checkpointing": args.checkpointing,
        "model_tensors_mib": model_tensor_bytes(trainer.model) / 2**20,
        "resident_before_mib": before / 2**20,
        "peak_mib": sampler.peak / 2**20,
        "training_adds_mib": (sampler.peak - before) / 2**20,
        "step_s": statistics.median(times[1:] or times),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
