"""Safe loading (sdgrpo.modeling): safetensors only, no remote code by default."""

from __future__ import annotations

import pytest


def test_safe_loading_refuses_pickled_weights(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from sdgrpo.config import parse_train_args
    from sdgrpo.errors import UserError
    from sdgrpo.modeling import load_model

    train_cfg, _ = parse_train_args([])
    assert train_cfg.trust_remote_code is False
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # weights only as a pickle
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(str(tmp_path / "pickled"), torch.float32, "cpu")
