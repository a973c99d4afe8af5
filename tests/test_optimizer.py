"""Optimizers: parity with transformers/torch, fused back pass, stochastic rounding, schedules, freezing parts."""

import io

import pytest
import torch
from transformers.optimization import Adafactor as TransformersAdafactor

from likeness.settings import Settings
from likeness.trainer.optimizer import (
    Adafactor, AdamW, FusedBackPass, build_lr_scheduler, build_optimizer, parts_to_train, set_trained_parts,
    stochastic_round_,
)

BF16_ULP_AT_1 = 2.0**-7


def make_settings(**sections) -> Settings:
    return Settings.model_validate(sections)


def tiny_model(dtype=torch.float32) -> torch.nn.ModuleDict:
    """Two "parts": a 2-layer MLP (unet) and a linear layer (text_encoder); 2-D and 1-D parameters."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "unet": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)),
        "text_encoder": torch.nn.Linear(8, 8),
    })
    return model.to(dtype)


def loss_of(model: torch.nn.ModuleDict, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return torch.nn.functional.mse_loss(model["unet"](model["text_encoder"](x.to(model["unet"][0].weight.dtype))).float(), y)


def parts(model: torch.nn.ModuleDict) -> dict:
    return {"unet": model["unet"].parameters(), "text_encoder": model["text_encoder"].parameters()}


def train(model, optimizer, steps, scheduler=None, fused=False, on_step=None):
    for step in range(steps):
        if on_step:
            on_step(step)
        loss_of(model, step).backward()
        if fused:
            assert all(p.grad is None for p in model.parameters()), "fused back pass must free gradients"
        optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()


def same_weights(a, b, atol=1e-7):
    return all(torch.allclose(p, q, rtol=1e-6, atol=atol) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("options", [{}, {"beta1": 0.9, "scale_parameter": True}])
def test_adafactor_matches_transformers_in_fp32(options):
    reference_values = dict(eps=1e-30, clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.01, relative_step=False, warmup_init=False)
    ours_model, theirs_model = tiny_model(), tiny_model()
    ours = Adafactor([{"params": ours_model["unet"].parameters(), "lr": 1e-3}, {"params": ours_model["text_encoder"].parameters(), "lr": 3e-4}],
                     eps2=1e-3, **reference_values, **options)
    options = {"scale_parameter": False, **options}
    theirs = TransformersAdafactor([{"params": theirs_model["unet"].parameters(), "lr": 1e-3}, {"params": theirs_model["text_encoder"].parameters(), "lr": 3e-4}],
                                   eps=(1e-30, 1e-3), **{k: v for k, v in reference_values.items() if k != "eps"}, **options)
    train(ours_model, ours, 8)
    train(theirs_model, theirs, 8)
    assert not same_weights(ours_model, tiny_model())
    assert same_weights(ours_model, theirs_model, atol=1e-8)


def test_adamw_matches_torch_in_fp32():
    ours_model, theirs_model = tiny_model(), tiny_model()
    ours = AdamW(ours_model.parameters(), lr=1e-3, weight_decay=0.01)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    train(ours_model, ours, 8)
    train(theirs_model, theirs, 8)
    assert not same_weights(ours_model, tiny_model())
    assert same_weights(ours_model, theirs_model, atol=1e-8)


def test_build_optimizer_gives_one_group_per_part_with_its_lr():
    settings = make_settings()
    optimizer = build_optimizer(parts(tiny_model()), settings)
    assert isinstance(optimizer, Adafactor)
    assert [(g["part"], g["lr"]) for g in optimizer.param_groups] == [("unet", 1e-5), ("text_encoder", 3e-6)]
    group = optimizer.param_groups[0]
    assert (group["eps"], group["eps2"], group["clip_threshold"], group["decay_rate"], group["weight_decay"]) == (1e-30, 1e-3, 1.0, -0.8, 0.01)
    assert group["beta1"] is None and not (group["relative_step"] or group["scale_parameter"] or group["warmup_init"])
    adamw = build_optimizer(parts(tiny_model()), make_settings(optimizer={"name": "ADAMW", "learning_rate": 2e-5}, training={"unet": {"learning_rate": None}}))
    assert isinstance(adamw, AdamW) and [g["lr"] for g in adamw.param_groups] == [2e-5, 3e-6]
    with pytest.raises(ValueError, match="unknown model parts"):
        build_optimizer({"vae": tiny_model().parameters()}, settings)


@pytest.mark.parametrize("name", ["ADAFACTOR", "ADAMW"])
def test_fused_back_pass_gives_the_same_weights_as_the_plain_step(name):
    settings = make_settings(optimizer={"name": name, "learning_rate": 1e-3}, training={"unet": {"learning_rate": 1e-3}, "text_encoder": {"learning_rate": 3e-4}},
                             schedule={"scheduler": "CONSTANT", "warmup_steps": 3})
    plain_model, fused_model = tiny_model(), tiny_model()
    plain = build_optimizer(parts(plain_model), settings)
    fused = build_optimizer(parts(fused_model), settings)
    FusedBackPass(fused, settings.training.gradient_accumulation_steps)
    train(plain_model, plain, 6, build_lr_scheduler(plain, settings.schedule, 6))
    train(fused_model, fused, 6, build_lr_scheduler(fused, settings.schedule, 6), fused=True)
    assert not same_weights(fused_model, tiny_model())
    assert same_weights(plain_model, fused_model)


def test_fused_back_pass_refuses_gradient_accumulation():
    optimizer = build_optimizer(parts(tiny_model()), make_settings())
    with pytest.raises(ValueError, match=r"optimizer\.fused_back_pass.*training\.gradient_accumulation_steps"):
        FusedBackPass(optimizer, gradient_accumulation_steps=2)


def test_stochastic_rounding_is_unbiased_and_only_picks_the_two_neighbours():
    generator = torch.Generator().manual_seed(0)
    for value in (1.0 + 0.3 * BF16_ULP_AT_1, -(1.0 + 0.8 * BF16_ULP_AT_1)):
        source = torch.full((200_000,), value)
        rounded = torch.empty(200_000, dtype=torch.bfloat16)
        stochastic_round_(rounded, source, generator)
        low, high = sorted((abs(value) // BF16_ULP_AT_1 * BF16_ULP_AT_1 * (1 if value > 0 else -1),
                            (abs(value) // BF16_ULP_AT_1 + 1) * BF16_ULP_AT_1 * (1 if value > 0 else -1)))
        assert set(rounded.float().unique().tolist()) == {low, high}
        assert rounded.double().mean().item() == pytest.approx(value, abs=0.01 * BF16_ULP_AT_1)
        assert source.to(torch.bfloat16).double().mean().item() != pytest.approx(value, abs=0.1 * BF16_ULP_AT_1)  # nearest is biased


def test_stochastic_rounding_accumulates_updates_that_round_to_nearest_loses():
    generator = torch.Generator().manual_seed(1)
    nearest = torch.ones(50_000, dtype=torch.bfloat16)
    stochastic = torch.ones(50_000, dtype=torch.bfloat16)
    for _ in range(200):  # 200 x 1e-4: each far below half a bf16 step (0.0039) at 1.0
        nearest.copy_(nearest.float() + 1e-4)
        stochastic_round_(stochastic, stochastic.float() + 1e-4, generator)
    assert torch.all(nearest == 1.0)
    assert stochastic.double().mean().item() == pytest.approx(1.02, abs=0.001)


def constant_gradient_run(dtype, stochastic_rounding, steps=100):
    """Adafactor on one (64, 64) weight with a fixed gradient: each step moves every element by ~lr."""
    weight = torch.nn.Parameter(torch.ones(64, 64, dtype=dtype))
    optimizer = Adafactor([weight], lr=1e-4, weight_decay=0.01, stochastic_rounding=stochastic_rounding, seed=3)
    grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).abs().to(dtype)
    for _ in range(steps):
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach().double()


def test_stochastic_rounding_lets_bf16_weights_follow_fp32_training():
    reference = constant_gradient_run(torch.float32, False)
    moved = (1.0 - reference).mean().item()
    assert moved > 0.005  # fp32 training moves the weights ...
    assert torch.all(constant_gradient_run(torch.bfloat16, False) == 1.0)  # ... bf16 rounded to nearest does not
    stochastic = constant_gradient_run(torch.bfloat16, True)
    assert (1.0 - stochastic).mean().item() == pytest.approx(moved, rel=0.05)  # stochastic rounding does, on average
    assert torch.equal(stochastic, constant_gradient_run(torch.bfloat16, True))  # and reproducibly


def test_state_dict_keeps_fp32_state_for_bf16_weights_and_resumes_exactly():
    settings = make_settings(optimizer={"learning_rate": 1e-3}, training={"unet": {"learning_rate": 1e-3}, "text_encoder": {"learning_rate": 1e-3}})
    straight_model = tiny_model(torch.bfloat16)
    straight = build_optimizer(parts(straight_model), settings)
    train(straight_model, straight, 6)

    first_model = tiny_model(torch.bfloat16)
    first = build_optimizer(parts(first_model), settings)
    train(first_model, first, 3)
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = tiny_model(torch.bfloat16)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(parts(resumed_model), settings)
    resumed.load_state_dict(saved["optimizer"])
    assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values() if torch.is_tensor(v))
    for step in range(3, 6):  # the same batches the straight run saw
        loss_of(resumed_model, step).backward()
        resumed.step()
        resumed.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(straight_model.parameters(), resumed_model.parameters()))


def scheduled_lrs(scheduler_name, warmup, total=10, **schedule):
    model = tiny_model()
    settings = make_settings(schedule={"scheduler": scheduler_name, "warmup_steps": warmup, **schedule})
    optimizer = build_optimizer(parts(model), settings)
    scheduler = build_lr_scheduler(optimizer, settings.schedule, total)
    lrs = []
    for _ in range(total):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves, but the scheduler sees the usual order
        scheduler.step()
    return lrs


def test_lr_schedules_keep_each_parts_lr():
    assert scheduled_lrs("CONSTANT", 0)[5] == [1e-5, 3e-6]
    warm = scheduled_lrs("CONSTANT", 4)
    assert [lr[0] for lr in warm[:6]] == pytest.approx([0, 2.5e-6, 5e-6, 7.5e-6, 1e-5, 1e-5])
    assert warm[2][1] == pytest.approx(1.5e-6)
    linear = scheduled_lrs("LINEAR", 0)
    assert [lr[0] for lr in linear[:3]] == pytest.approx([1e-5, 9e-6, 8e-6])
    cosine = scheduled_lrs("COSINE", 2)
    assert cosine[2][0] == pytest.approx(1e-5) and cosine[6][0] == pytest.approx(0.5e-5)
    restarts = scheduled_lrs("COSINE_WITH_RESTARTS", 0, cycles=2)
    assert restarts[5][0] == pytest.approx(1e-5) and restarts[4][0] < 2e-6  # restarted at the half


def test_parts_to_train_follows_stop_training_after():
    training = make_settings(training={"text_encoder": {"stop_training_after": 2, "stop_training_after_unit": "EPOCH"}}).training
    assert parts_to_train(training, epoch=1, step=500) == {"unet", "text_encoder"}
    assert parts_to_train(training, epoch=2, step=0) == {"unet"}
    never = make_settings(training={"text_encoder": {"stop_training_after": 0, "stop_training_after_unit": "STEP"}}).training
    assert parts_to_train(never, 0, 0) == {"unet"}  # 0 with a unit: never trains
    unlimited = make_settings(training={"text_encoder": {"stop_training_after": 0, "stop_training_after_unit": "NEVER"}}).training
    assert parts_to_train(unlimited, 99, 9999) == {"unet", "text_encoder"}
    te2 = make_settings(training={"text_encoder_2": {"train": True}}).training
    assert "text_encoder_2" in parts_to_train(te2, 0, 0) and "text_encoder_2" not in parts_to_train(training, 0, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_stop_training_after_freezes_text_encoder_at_the_right_step(fused):
    settings = make_settings(optimizer={"learning_rate": 1e-3}, training={
        "unet": {"learning_rate": 1e-3}, "text_encoder": {"learning_rate": 1e-3, "stop_training_after": 3, "stop_training_after_unit": "STEP"}})
    model = tiny_model()
    optimizer = build_optimizer(parts(model), settings)
    if fused:
        FusedBackPass(optimizer)
    te_history, unet_history = [], []

    def before_step(step):  # re-evaluated after every optimizer step, i.e. before the next one
        set_trained_parts(optimizer, parts_to_train(settings.training, epoch=0, step=step))
        te_history.append(model["text_encoder"].weight.detach().clone())
        unet_history.append(model["unet"][0].weight.detach().clone())

    train(model, optimizer, 6, fused=fused, on_step=before_step)
    te_moved = [not torch.equal(a, b) for a, b in zip(te_history, te_history[1:])]
    assert te_moved == [True, True, True, False, False]  # steps 0, 1, 2 train it; then frozen
    assert all(not torch.equal(a, b) for a, b in zip(unet_history, unet_history[1:]))
    assert not model["text_encoder"].weight.requires_grad and not optimizer.param_groups[1]["train"]
