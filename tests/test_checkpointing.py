"""Optimizer, scheduler and RNG state round-trip through safetensors + JSON exactly."""

import random

import numpy as np
import torch

from sdgrpo import checkpointing as checkpoint_state


def test_optimizer_and_scheduler_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    checkpoint_state.save_optimizer(opt.state_dict(), tmp_path)
    checkpoint_state.save_scheduler(sched.state_dict(), tmp_path)

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    opt2.load_state_dict(checkpoint_state.load_optimizer(tmp_path))
    sched2.load_state_dict(checkpoint_state.load_scheduler(tmp_path))
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])
    assert b["param_groups"][0]["lr"] == a["param_groups"][0]["lr"] and list(b["param_groups"][0]["betas"]) == [0.9,
                                                                                                              0.95]
    assert sched2.last_epoch == sched.last_epoch == 3


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint_state.save_rng(tmp_path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert checkpoint_state.load_rng(tmp_path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert not checkpoint_state.load_rng(tmp_path, rank=5)
