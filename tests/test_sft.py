"""`sdgrpo sft` and the held-out evaluation during training (both verbs), end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import reference_logps, run_cli


def independent_bpb(model_dir, adapter_dir, prepared, prompts: int) -> float:
    """Bits per byte of the test split's true continuations under base + adapter: one unpadded forward each."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    test = load_from_disk(str(prepared))["test"].select(range(prompts))
    nats = 0.0
    for prompt, cont in zip(test["prompt"], test["continuation"]):
        nats -= reference_logps(model, tok(prompt)["input_ids"],
                                tok(cont, add_special_tokens=False)["input_ids"]).sum().item()
    return nats / math.log(2) / sum(len(c.encode()) for c in test["continuation"])


def test_sft_trains_logs_heldout_and_keeps_the_best(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "sft"
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--max_steps", 6, "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to",
                "none", "--heldout_eval_steps", 3, "--heldout_eval_prompts", 8, "--keep_best_heldout", "true",
                "--save_strategy", "no")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"adapter_model.safetensors", "adapter_config.json", "resolved_config.yaml", "metrics.jsonl",
            "heldout.json"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4, 5, 6]
    logged = {x["step"]: x["heldout/bpb"] for x in rows if "heldout/bpb" in x}
    held = json.loads((out / "heldout.json").read_text())
    assert [h["step"] for h in held["history"]] == [0, 3, 6] and set(logged) == {3, 6}
    assert all(logged[h["step"]] == pytest.approx(h["heldout_bpb"]) for h in held["history"][1:])
    step, best = held["best"]
    assert best == min(h["heldout_bpb"] for h in held["history"]) and best < held["history"][0]["heldout_bpb"]
    # The final adapter is the best one, and its figure is what an independent computation gives.
    assert independent_bpb(tiny_model_dir, out, prepared, 8) == pytest.approx(best, rel=1e-4)
    assert "learning_rate: 0.003" in (out / "resolved_config.yaml").read_text()


def test_keep_best_heldout_measures_the_last_step_of_a_run_shorter_than_its_interval(tmp_path, prepared,
                                                                                     tiny_model_dir):
    """A run of 4 steps measured every 50 (and one of 4 measured every 3): the last step is measured too, so the
    trained adapter is a candidate; before, only step 0 was, and the run ended with the untrained adapter (every
    lora_B zero) while saying it kept the best."""
    from safetensors.torch import load_file

    for every, steps in ((50, [0, 4]), (3, [0, 3, 4])):
        out = tmp_path / f"sft{every}"
        r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                    "--max_steps", 4, "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to",
                    "none", "--heldout_eval_steps", every, "--heldout_eval_prompts", 8, "--keep_best_heldout", "true",
                    "--save_strategy", "no")
        assert r.returncode == 0, r.stderr[-3000:]
        held = json.loads((out / "heldout.json").read_text())
        assert [h["step"] for h in held["history"]] == steps
        logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "heldout/bpb" in x]
        assert [x["step"] for x in logged] == steps[1:]
        step, best = held["best"]
        assert step == 4 and best < held["history"][0]["heldout_bpb"], held
        weights = load_file(out / "adapter_model.safetensors")
        assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
        assert independent_bpb(tiny_model_dir, out, prepared, 8) == pytest.approx(best, rel=1e-4)


def test_keep_best_heldout_says_when_no_trained_step_beat_the_untrained_adapter(tmp_path, tiny_tokenizer, caplog,
                                                                             monkeypatch):
    """Where step 0 stays the best, the final adapter is the untrained one: a warning says so and what to do."""
    from types import SimpleNamespace

    from datasets import Dataset

    import sdgrpo.callbacks as callbacks

    rows = Dataset.from_dict({"prompt": ["In the beginning"], "continuation": [" God created"]})
    heldout = callbacks.HeldoutEval(rows, tiny_tokenizer, 2, tmp_path, keep_best=True)
    (tmp_path / callbacks.BEST_DIR).mkdir()
    (tmp_path / callbacks.BEST_DIR / "adapter_model.safetensors").write_bytes(b"")
    heldout.history = [{"step": 0, "heldout_bpb": 3.5}, {"step": 2, "heldout_bpb": 3.9}]
    heldout.best = (0, 3.5)
    copied = []
    monkeypatch.setattr(callbacks, "copy_adapter", lambda src, dst: copied.append((src, dst)))
    with caplog.at_level("INFO", logger="sdgrpo.callbacks"):
        callbacks.keep_best_heldout(heldout, tmp_path, SimpleNamespace(args=SimpleNamespace(should_save=True)))
    assert copied == [(tmp_path / callbacks.BEST_DIR, tmp_path)]
    assert "untrained one, which changes nothing" in caplog.text and "3.9000 at step 2" in caplog.text
    assert json.loads((tmp_path / "heldout.json").read_text())["best"] == [0, 3.5]


def test_grpo_with_context_distill_logs_heldout(tmp_path, prepared, tiny_model_dir):
    out = tmp_path / "grpo"
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--reward", "context_distill", "--max_steps", 2, "--per_device_train_batch_size", 4,
                "--num_generations", 4, "--max_completion_length", 8, "--report_to", "none",
                "--heldout_eval_steps", 1, "--heldout_eval_prompts", 4, "--save_strategy", "no")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [x["step"] for x in rows] == [1, 2]
    assert all(math.isfinite(x["heldout/bpb"]) and math.isfinite(x["rewards/context_distill/mean"]) for x in rows)
    held = json.loads((out / "heldout.json").read_text())
    assert independent_bpb(tiny_model_dir, out, prepared, 4) == pytest.approx(held["history"][-1]["heldout_bpb"],
                                                                              rel=1e-4)


def test_missing_continuation_is_one_line(tmp_path, tiny_model_dir):
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["In the beginning God created"] * 8}).save_to_disk(str(tmp_path / "d"))
    for verb, extra in (("train", ["--reward", "context_distill"]), ("sft", [])):
        r = run_cli(verb, "--model_name_or_path", tiny_model_dir, "--dataset_path", tmp_path / "d", "--output_dir",
                    tmp_path / verb, "--max_steps", 1, *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "'continuation' column" in r.stderr.strip().splitlines()[-1]


def test_kd_loss_is_cross_entropy_and_kl_per_counted_token(tiny_tokenizer):
    """Against one unpadded fp64 pass per sequence: CE of the true next tokens and KL(teacher || student) over the
    vocabulary, averaged over the counted tokens (padding and -100 labels left out)."""
    from conftest import make_llama
    from sdgrpo.sft import kd_loss

    student, teacher = make_llama(tiny_tokenizer, seed=1), make_llama(tiny_tokenizer, seed=2)
    texts = ["In the beginning God created the heaven", "And the earth was without form", "Then"]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[0, 3] = -100  # a label left out inside a row
    with torch.no_grad():
        loss, ce, kl = kd_loss(student(**enc).logits, teacher(**enc).logits, labels, 0.3)
    ce_sum = kl_sum = n = 0.0
    for row, text in enumerate(texts):
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
            t = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
        for pos in range(ids.size(1) - 1):
            if labels[row, pos + 1] == -100:
                continue
            ce_sum -= s[pos, ids[0, pos + 1]].item()
            kl_sum += (t[pos].exp() * (t[pos] - s[pos])).sum().item()
            n += 1
    assert n == int((labels[:, 1:] != -100).sum())
    assert ce.item() == pytest.approx(ce_sum / n, rel=1e-5) and kl.item() == pytest.approx(kl_sum / n, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * ce_sum / n + 0.3 * kl_sum / n, rel=1e-5)
    # the Trainer's token count, where given, is the divisor
    _, ce2, kl2 = kd_loss(student(**enc).logits, teacher(**enc).logits, labels, 0.3, num_items_in_batch=2 * n)
    assert ce2.item() == pytest.approx(ce_sum / n / 2, rel=1e-5) and kl2.item() == pytest.approx(kl_sum / n / 2,
                                                                                                rel=1e-5)


def test_sft_with_a_teacher_distils_and_logs_both_terms(tmp_path, prepared, tiny_model_dir, tiny_tokenizer):
    from conftest import make_llama

    teacher = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=5).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    common = ["--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--max_steps", 4,
              "--per_device_train_batch_size", 4, "--learning_rate", "3e-3", "--report_to", "none",
              "--save_strategy", "no"]
    runs = {"other": (teacher, 0.4), "self": (tiny_model_dir, 1.0)}
    for name, (path, weight) in runs.items():
        r = run_cli("sft", *common, "--output_dir", tmp_path / name, "--teacher_model_name_or_path", path,
                    "--kd_weight", weight)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert [x["step"] for x in rows] == [1, 2, 3, 4]
        for x in rows:  # the logged loss is the weighted sum of the two logged terms
            assert x["loss"] == pytest.approx((1 - weight) * x["kd/cross_entropy"] + weight * x["kd/kl"], rel=1e-3,
                                              abs=1e-6)
        if name == "other":
            assert all(x["kd/kl"] > 0.01 for x in rows)
        else:  # the student's own base as the teacher: the adapter starts at zero, so the first step's KL is 0
            # (AdamW then turns the near-zero gradients into steps of the learning rate's size: small, not zero)
            assert abs(rows[0]["kd/kl"]) < 1e-6 and rows[0]["kd/cross_entropy"] > 1
            assert all(x["kd/kl"] < 1e-2 for x in rows)
    assert "kd_weight: 0.4" in (tmp_path / "other" / "resolved_config.yaml").read_text()


def kd_rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_kd_terms_are_per_token_means_under_gradient_accumulation(tmp_path, prepared, tiny_model_dir,
                                                                    tiny_tokenizer):
    """One batch of 4 examples as 1 x 4 or 4 micro-batches of 1: the first step (before any update) logs the same
    cross-entropy and KL, and every step's loss is the weighted sum of its logged terms."""
    from conftest import make_llama

    teacher = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=5).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    rows = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        out = tmp_path / f"ga{accumulation}"
        r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--max_steps", 3,
                    "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation,
                    "--learning_rate", "3e-3", "--report_to", "none", "--save_strategy", "no", "--output_dir", out,
                    "--teacher_model_name_or_path", teacher, "--kd_weight", 0.4)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[accumulation] = kd_rows(out)
        for x in rows[accumulation]:
            assert x["loss"] == pytest.approx(0.6 * x["kd/cross_entropy"] + 0.4 * x["kd/kl"], rel=1e-3, abs=1e-6)
    for name in ("kd/cross_entropy", "kd/kl", "loss"):
        assert rows[4][0][name] == pytest.approx(rows[1][0][name], rel=1e-4), name


def test_a_teacher_with_another_tokenizer_is_one_line(tmp_path, prepared, tiny_model_dir):
    from sdgrpo.config import TINY_MODEL

    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir",
                tmp_path / "o", "--max_steps", 1, "--teacher_model_name_or_path", TINY_MODEL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "tokenizer differs from the student's" in r.stderr.strip().splitlines()[-1]
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir",
                tmp_path / "o", "--max_steps", 1, "--kd_weight", "1.5")
    assert r.returncode == 2 and "--kd_weight must be in [0, 1], not 1.5" in r.stderr.strip().splitlines()[-1]


def test_sft_of_every_weight_distils_a_teacher_into_a_whole_model(tmp_path, prepared, tiny_model_dir, tiny_tokenizer):
    """--use_peft false: every weight trains (fp32), the folder holds the whole model, and after a few steps of
    kd_weight 1 the student's KL to the teacher on the training text is lower than its base's (an own pass)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import make_llama
    from sdgrpo.data import load_prompts
    from sdgrpo.sft import kd_loss

    teacher_dir = tmp_path / "teacher"
    make_llama(tiny_tokenizer, seed=5).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "full"
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir", out,
                "--use_peft", "false", "--teacher_model_name_or_path", teacher_dir, "--kd_weight", 1,
                "--max_steps", 12, "--per_device_train_batch_size", 8, "--learning_rate", "3e-3", "--report_to",
                "none", "--save_strategy", "no", "--lr_scheduler_type", "constant")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model (every weight trained) saved to" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"model, resolved_config.yaml and metrics.jsonl in {out}"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    base, trained = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(trained) == set(base) and all(v.dtype == torch.float32 for v in trained.values())
    assert all(not torch.equal(trained[k], base[k]) for k in base), "some weights did not train"
    card = (out / "README.md").read_text()
    assert "full-fine-tune" in card and "distilling" in card and "library_name: transformers" in card

    texts = [ex["prompt"] + ex["continuation"] for ex in load_prompts(str(prepared), "train", 16)]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        t_logits = teacher(**enc).logits
        kl = {name: kd_loss(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(**enc).logits,
                            t_logits, labels, 1.0)[2].item() for name, path in (("base", tiny_model_dir),
                                                                                  ("trained", out))}
    assert kl["trained"] < 0.8 * kl["base"], kl


def test_every_weight_is_for_sft_only(tmp_path, prepared, tiny_model_dir):
    r = run_cli("train", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir",
                tmp_path / "t", "--max_steps", 1, "--use_peft", "false")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "sdgrpo train trains LoRA adapters only" in r.stderr.strip().splitlines()[-1]
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", prepared, "--output_dir",
                tmp_path / "s", "--max_steps", 1, "--use_peft", "false", "--heldout_eval_steps", 1,
                "--keep_best_heldout", "true")
    assert r.returncode == 2 and "with --use_peft false there is none" in r.stderr.strip().splitlines()[-1]


def test_kd_loss_in_chunks_holds_no_batch_sized_fp32_tensor_for_backward(tiny_tokenizer):
    """Chunked (one row per chunk here) and checkpointed: the same loss and gradient as the whole batch at once,
    and no tensor of the batch's [tokens, vocab] is saved for the backward pass (the plain form saved several)."""
    from conftest import make_llama
    from sdgrpo.sft import kd_loss

    student, teacher = make_llama(tiny_tokenizer, seed=1), make_llama(tiny_tokenizer, seed=2)
    enc = tiny_tokenizer(["In the beginning God created the heaven", "And the earth", "Then the"],
                         return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        s_logits, t_logits = student(**enc).logits, teacher(**enc).logits
    vocab, tokens = s_logits.size(-1), labels.size(1) - 1
    grads, saved = [], []

    def pack(t):
        saved.append(t.numel() if t.dtype == torch.float32 else 0)
        return t

    for budget in (1 << 40, tokens * vocab * 4):  # everything in one chunk; one row per chunk
        leaf = s_logits.clone().requires_grad_(True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, ce, kl = kd_loss(leaf, t_logits, labels, 0.3, logits_bytes=budget)
        loss.backward()
        grads.append((loss.item(), ce.item(), kl.item(), leaf.grad))
        largest = max(saved, default=0)
    assert grads[0][:3] == pytest.approx(grads[1][:3], rel=1e-6)
    assert torch.allclose(grads[0][3], grads[1][3], atol=1e-8)
    counted = int((labels[:, 1:] != -100).sum())
    assert largest < counted * vocab  # no [counted tokens, vocab] fp32 tensor held for backward


def test_sft_leaves_its_prepared_folder_as_prepare_wrote_it(tmp_path, tiny_model_dir, corpus):
    """SFTTrainer tokenises the dataset with ``map``: a dataset read from its folder would get the map's cache files
    written beside its arrow files, in the user's folder, and `sdgrpo prepare` would then refuse to rebuild it (files
    it did not write). Read into memory, nothing is written there: the folder holds what prepare wrote and is
    rebuilt."""
    data = tmp_path / "prepared"
    args = ("prepare", corpus / "ruth.txt", "--output", data, "--model", tiny_model_dir, "--max_prompt_tokens", "24")
    assert run_cli(*args).returncode == 0
    written = sorted(p.relative_to(data) for p in data.rglob("*"))
    r = run_cli("sft", "--model_name_or_path", tiny_model_dir, "--dataset_path", data, "--output_dir",
                tmp_path / "sft", "--max_steps", 1, "--per_device_train_batch_size", 2, "--report_to", "none",
                "--save_strategy", "no", "--heldout_eval_steps", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == written
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
