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


def test_a_model_path_that_is_a_file_or_lacks_a_tokenizer_says_what_to_pass(tmp_path):
    """A file given as the model, and a folder whose tokenizer cannot load, are one line naming the path, what is
    wrong and what to pass (they named the path and the error only)."""
    from sdgrpo.errors import UserError
    from sdgrpo.modeling import check_model_path, load_tokenizer

    text = tmp_path / "alice.txt"
    text.write_text("not a model")
    with pytest.raises(UserError) as err:
        check_model_path(str(text))
    assert str(err.value) == (f"{text}: a file, not a model folder; pass a folder saved with save_pretrained, or a "
                              "hub name")
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        load_tokenizer(str(folder))
    assert str(err.value).startswith(f"{folder}: cannot load a tokenizer (")
    assert str(err.value).endswith("the folder needs its tokenizer's files (tokenizer.json or tokenizer.model, "
                                   "tokenizer_config.json) as save_pretrained writes them")
