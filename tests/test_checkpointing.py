"""Optimizer, scheduler and RNG state round-trip through safetensors + JSON exactly; what resuming trusts."""

import json
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


def test_metrics_cut_back_to_a_step_drop_a_torn_last_line(tmp_path):
    """A crash while a record was appended leaves half a line: cutting back for --resume drops it instead of
    stopping on it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": -s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "rew')
    checkpoint_state.truncate_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 1, "reward": -1},
                                                                      {"step": 2, "reward": -2}]


def test_a_checkpoint_whose_file_changed_size_is_passed_over(tmp_path):
    """The completion marker records each file's size; a checkpoint whose file is shorter (or missing) is not the
    one resumed from, the newest whole one before it is."""
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(bytes(100 * step))
        (folder / "sub" / "state.json").write_text("{}")
        checkpoint_state.write_marker(folder, {"step": step})
    assert checkpoint_state.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(bytes(7))
    assert checkpoint_state.checkpoint_damage(tmp_path / "checkpoint-4") == \
        "adapter_model.safetensors holds 7 bytes where 400 were written"
    assert checkpoint_state.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / "checkpoint-2" / "sub" / "state.json").unlink()
    assert checkpoint_state.last_complete_checkpoint(tmp_path) is None



def test_a_run_of_the_shipped_model_resumes_wherever_sdgrpo_is_installed_now(tmp_path):
    """resolved_config.yaml holds the shipped model's absolute path (the default model_name_or_path): a resume
    from another install of sdgrpo (a new environment, another checkout) names the same model and is not refused;
    another shipped model, or a user's folder of that name, still is."""
    import pytest
    import yaml

    from sdgrpo.errors import UserError

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"x")
    checkpoint_state.write_marker(out / "checkpoint-2", {"step": 2})
    old = "/old/env/lib/python3.11/site-packages/sdgrpo/assets/tiny-llama"
    (out / "resolved_config.yaml").write_text(yaml.safe_dump({"model_name_or_path": old, "output_dir": str(out)}))
    now = {"model_name_or_path": str(tmp_path / "checkout" / "src" / "sdgrpo" / "assets" / "tiny-llama"),
           "output_dir": str(out)}
    assert checkpoint_state.check_resume(out, now) == out / "checkpoint-2"
    for other in (str(tmp_path / "src" / "sdgrpo" / "assets" / "tiny-qwen"), str(tmp_path / "models" / "tiny-llama")):
        with pytest.raises(UserError, match="was trained with other settings .model_name_or_path"):
            checkpoint_state.check_resume(out, {**now, "model_name_or_path": other})
