"""transformers Trainer integration: optimizer + scheduler from TrainingArguments, callback,
gradient accumulation, and the guard against plain optimizers on the factors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_bert_config
from transformers import (
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, load_adapter, rank_report
from geolora.model import geolora_layers
from geolora.trainer import (
    GeoLoRACallback,
    add_geolora_callback,
    check_optimizer,
    create_geolora_optimizer,
)


@pytest.fixture
def model(tiny_bert):
    cfg = GeoLoRAConfig(
        target_modules=["query", "value"], r=2, r_max=8, tau=0.05, modules_to_save=["classifier"]
    )
    return get_geolora_model(tiny_bert, cfg)


def dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (10,), generator=g),
            "attention_mask": torch.ones(10, dtype=torch.long),
            "labels": int(torch.randint(0, 2, (), generator=g)),
        }
        for _ in range(n)
    ]


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=2e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: sees the logs the Trainer hands to callbacks."""

    def __init__(self):
        self.logs = []
        self.micro_batches = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.micro_batches += 1


def test_optimizer_and_scheduler_follow_training_arguments(model, tmp_path):
    args = training_args(
        tmp_path, learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=2
    )
    opt, sched = create_geolora_optimizer(model, args, 10, base_rule="sgd", momentum=0.5)
    assert isinstance(opt, GeoLoRAOptimizer)
    group = opt.param_groups[0]
    assert (group["base_rule"], group["momentum"], group["weight_decay"]) == ("sgd", 0.5, 0.01)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    reference = get_scheduler("cosine", reference_opt, num_warmup_steps=2, num_training_steps=10)
    for _ in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op that keeps the scheduler's step order
        reference_opt.step()
        sched.step()
        reference.step()
    with pytest.raises(ValueError, match="TrainingArguments"):
        create_geolora_optimizer(model, args, 10, lr=1.0)
    with pytest.raises(ValueError, match="num_training_steps"):
        create_geolora_optimizer(model, args, 0)


def test_trainer_end_to_end_with_gradient_accumulation(model, tmp_path):
    args = training_args(tmp_path, gradient_accumulation_steps=2, lr_scheduler_type="constant")
    opt, sched = create_geolora_optimizer(model, args, args.max_steps)
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizers=(opt, sched),
        callbacks=[recorder],
    )
    callback = add_geolora_callback(trainer, GeoLoRACallback(report_dir=tmp_path / "ranks"))
    initial = rank_report(model)["total_rank"]
    trainer.train()

    # one GeoLoRA step per optimizer step, not per micro-batch
    assert trainer.state.global_step == 3
    assert recorder.micro_batches == 6
    assert opt.param_groups[0]["steps"] == 3
    assert rank_report(model)["total_rank"] != initial  # ranks moved during Trainer training

    # rank metrics reach callbacks that come before user callbacks (report_to integrations)
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 3
    final = rank_report(model)
    last = train_logs[-1]
    assert last["geolora/total_rank"] == final["total_rank"]
    assert last["geolora/trainable_params"] == final["trainable_params"]
    for name, rank in final["ranks"].items():
        assert last[f"geolora/rank/{name}"] == rank
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["geolora/total_rank"] == final["total_rank"]

    # rank history: the start plus one record per optimizer step, and a report on train end
    assert callback.history.steps == [0, 1, 2, 3]
    assert callback.history.total_rank[0] == initial
    assert callback.history.total_rank[-1] == final["total_rank"]
    saved = json.loads((tmp_path / "ranks" / "rank_history.json").read_text())
    assert saved["steps"] == [0, 1, 2, 3]
    assert (tmp_path / "ranks" / "rank_heatmap.png").stat().st_size > 1000

    with pytest.raises(ValueError, match="already has a GeoLoRACallback"):
        add_geolora_callback(trainer)


def test_trainer_without_geolora_optimizer_refuses_to_train(model, tmp_path):
    """Without ``optimizers=``, the Trainer builds AdamW over every trainable parameter,
    U, S and V included; the callback stops training before the first step."""
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=dataset(),
        callbacks=[GeoLoRACallback()],
    )
    before = {name: layer.U.detach().clone() for name, layer in geolora_layers(model).items()}
    with pytest.raises(ValueError, match="plain AdamW: its steps would corrupt them"):
        trainer.train()
    for name, layer in geolora_layers(model).items():
        assert torch.equal(layer.U, before[name])


def test_trainer_without_optimizer_or_callback_raises_before_any_change(model, tmp_path):
    """No callback and no ``optimizers=``: the process-wide guard stops the Trainer's AdamW at
    its first step, and names the fix."""
    from geolora.optim.guard import PlainOptimizerError

    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(PlainOptimizerError, match="create_geolora_optimizer"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_check_optimizer(model, tiny_gpt2):
    check_optimizer(GeoLoRAOptimizer(model), model)  # the right optimizer passes
    with pytest.raises(ValueError, match=r"query\.U.*plain SGD"):
        check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    head_only = torch.optim.AdamW(model.classifier.parameters())
    with pytest.raises(ValueError, match="never change"):
        check_optimizer(head_only, model)
    other = get_geolora_model(tiny_gpt2, GeoLoRAConfig(target_modules=["c_attn"], r=2))
    with pytest.raises(ValueError, match="built on another model"):
        check_optimizer(GeoLoRAOptimizer(other), model)

    class Wrapper(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

    check_optimizer(Wrapper(GeoLoRAOptimizer(model)), model)
    with pytest.raises(ValueError, match="plain Adam"):
        check_optimizer(Wrapper(torch.optim.Adam(model.parameters())), model)


def test_warmup_ratio_is_applied(model, tmp_path):
    args = training_args(tmp_path, warmup_steps=0.25, lr_scheduler_type="linear")
    opt, sched = create_geolora_optimizer(model, args, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert peak == math.ceil(0.25 * 8) and lrs[0] == 0.0


def test_trainer_resume_from_its_own_checkpoint_is_exact(tmp_path):
    """The Trainer's checkpoints (the GeoLoRA adapter with its ranks, optimizer state, RNG) are
    enough: resuming reproduces the uninterrupted run, dropout included. A checkpoint holds the
    adapter, not the base model, and save_model() writes an adapter that load_adapter reloads."""

    def run(adapter_seed, resume=None):
        torch.manual_seed(0)
        base = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.1))
        torch.manual_seed(adapter_seed)
        cfg = GeoLoRAConfig(
            target_modules=["query", "value"],
            r=2,
            r_max=8,
            tau=0.05,
            lora_dropout=0.1,
            modules_to_save=["classifier"],
        )
        model = get_geolora_model(base, cfg)
        args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset(),
            optimizers=create_geolora_optimizer(model, args, args.max_steps),
        )
        add_geolora_callback(trainer)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(tmp_path / "final"))
        return model, {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    model, uninterrupted = run(adapter_seed=0)
    files = {p.name for p in (tmp_path / "checkpoint-3").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.1))
    reloaded = load_adapter(base, tmp_path / "final")
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-6)
    _, resumed = run(adapter_seed=1, resume=str(tmp_path / "checkpoint-3"))
    assert max((uninterrupted[k] - resumed[k]).abs().max().item() for k in resumed) <= 1e-6


def test_load_best_model_at_end_restores_the_best_adapter(model, tmp_path):
    args = training_args(
        tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
        eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the highest loss: an early checkpoint, not the final state
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(8, seed=1),
        optimizers=create_geolora_optimizer(model, args, args.max_steps),
    )  # fmt: skip
    add_geolora_callback(trainer)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # else the test shows nothing
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    reference = load_adapter(BertForSequenceClassification(tiny_bert_config()), best)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
