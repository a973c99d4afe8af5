"""EMA of trained weights: the averaging maths, the update interval, CPU copies, swapping in, backups."""

import pytest
import torch

from likeness.trainer.ema import EMA


def tiny_module(dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).to(dtype)


def set_weights(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_average_follows_the_formula_with_warmup_decay():
    module = tiny_module()
    set_weights(module, 0.0)
    ema = EMA(module.parameters(), decay=0.9)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]):
        set_weights(module, value)
        assert ema.step(module.parameters(), step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    assert ema.current_decay(0) == pytest.approx(0.1) and ema.current_decay(100) == 0.9
    assert all(torch.allclose(a, torch.full_like(a, expected)) for a in ema.averages)


def test_update_step_interval_skips_steps():
    module = tiny_module()
    ema = EMA(module.parameters(), decay=0.5, update_step_interval=3)
    before = [a.clone() for a in ema.averages]
    set_weights(module, 4.0)
    assert not ema.step(module.parameters(), 0) and not ema.step(module.parameters(), 1)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, before))
    assert ema.step(module.parameters(), 2)  # the 3rd optimizer step
    assert all(not torch.equal(a, b) for a, b in zip(ema.averages, before))


def test_cpu_copy_in_float32_for_bf16_weights():
    module = tiny_module(torch.bfloat16)
    ema = EMA(module.parameters(), decay=0.999, on_cpu=True)
    assert all(a.device.type == "cpu" and a.dtype == torch.float32 for a in ema.averages)
    set_weights(module, 1.0)
    for step in range(2000, 2010):  # past the warmup: each move is 0.001 x (1 - average), below bf16's resolution
        ema.step(module.parameters(), step)
    start = [p.float() for p in tiny_module(torch.bfloat16).parameters()]
    assert all(not torch.equal(a, s) for a, s in zip(ema.averages, start))


def test_frozen_parameters_keep_their_average():
    module = tiny_module()
    module.bias.requires_grad_(False)
    ema = EMA(module.parameters(), decay=0.5)
    bias_before = ema.averages[1].clone()
    set_weights(module, 3.0)
    ema.step(module.parameters(), 50)
    assert torch.equal(ema.averages[1], bias_before) and not torch.equal(ema.averages[0], module.weight.detach())


def test_applied_to_swaps_the_average_in_and_restores_the_weights():
    module = tiny_module()
    ema = EMA(module.parameters(), decay=0.5)
    set_weights(module, 7.0)
    trained = [p.detach().clone() for p in module.parameters()]
    with ema.applied_to(module.parameters()):
        assert all(torch.equal(p, a) for p, a in zip(module.parameters(), ema.averages))
    assert all(torch.equal(p, t) for p, t in zip(module.parameters(), trained))


def test_state_dict_round_trip_and_mismatch_error():
    module = tiny_module()
    ema = EMA(module.parameters(), decay=0.9)
    set_weights(module, 2.0)
    for step in range(5):
        ema.step(module.parameters(), step)
    state = ema.state_dict()
    restored = EMA(tiny_module().parameters(), decay=0.9)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.averages, ema.averages))
    set_weights(module, 5.0)
    ema.step(module.parameters(), 5)
    restored.step(module.parameters(), 5)
    assert all(torch.equal(a, b) for a, b in zip(restored.averages, ema.averages))
    with pytest.raises(ValueError, match="does not fit"):
        EMA(torch.nn.Linear(4, 2).parameters()).load_state_dict(state)
