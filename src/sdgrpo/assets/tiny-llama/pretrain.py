"""Pretrain the tiny default model: a BPE tokenizer and a small Llama on public-domain books.

The recipe behind the model beside it (``sdgrpo/assets/tiny-llama``; its README is the model card), kept with the
model rather than in the library: ``sdgrpo pretrain`` runs it (:func:`sdgrpo.config.tiny_model_recipe` loads it), and
what users call from it, held-out bits per byte and the in-context probes, is :mod:`sdgrpo.probes`. Every text is
split into its first 95%
(training) and last 5% (held out); held-out bits per byte are reported with a unigram baseline on the same slice,
and the in-context copying probes of :mod:`sdgrpo.probes` (induction score, context gain) at the end.

``repeat_fraction`` of the training rows get a span of ``repeat_min_tokens``-``repeat_max_tokens`` tokens copied to
a later place in the same row: prose rarely repeats itself within a window, and without such repeats a model this
small never learns to copy from its context (no induction heads).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdgrpo.probes import evaluate_bpb, induction_score, load_corpus, probe, unigram_nll
from sdgrpo.textio import read_text_file

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<pad>"
# The sub-corpora of ../shared/data that the model is trained on (WikiText is left out: it is a tokenized variant).


@dataclass
class PretrainConfig:
    data_dir: str = ""  # required: a folder of .txt files (or of the shipped model's corpus folders)
    output_dir: str = "outputs/tiny-llama"
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 688
    seq_len: int = 256
    batch_size: int = 64
    max_steps: int = 3000
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    heldout_fraction: float = 0.05
    eval_every: int = 500
    seed: int = 0
    compile: bool = False
    repeat_fraction: float = 0.0  # training rows with a span copied to a later place in the row
    repeat_min_tokens: int = 16
    repeat_max_tokens: int = 128
    # Text the model never trained on, for the context gain (default: data_dir/wikitext-2/valid.txt if there, else
    # the held-out slices).
    unseen_path: str = ""
    # A tokenizer folder to reuse instead of training one (a teacher for the shipped model must share its vocabulary).
    tokenizer_path: str = ""
    # Stop training after this many seconds (0: no limit); the model is still evaluated and saved. With resume_dir,
    # the seconds of earlier calls count too (the learning-rate schedule spans the whole run).
    max_seconds: float = 0.0
    # Keep the training state (weights, optimizer, samplers, step, seconds, history; safetensors + JSON) in this
    # folder, and continue from it when it is there: a run split over several calls, e.g. on a machine whose commands
    # have a time limit.
    resume_dir: str = ""
    # Stop this call after this many seconds (0: no limit), saving the state for the next call.
    session_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def add_repeats(batch: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Copy a random span of each selected row to a later, non-overlapping place in the same row (in place).

    Rows are selected with probability ``repeat_fraction``; span lengths are uniform in
    [``repeat_min_tokens``, ``repeat_max_tokens``] (capped at half the row). Random numbers come from ``gen``, so a
    resumed run draws the same spans.
    """
    rows, width = batch.shape
    picked = torch.rand(rows, generator=gen) < cfg.repeat_fraction
    high = min(cfg.repeat_max_tokens, width // 2)
    for r in picked.nonzero().flatten().tolist():
        length = int(torch.randint(min(cfg.repeat_min_tokens, high), high + 1, (1,), generator=gen))
        src = int(torch.randint(0, width - 2 * length + 1, (1,), generator=gen))
        dst = int(torch.randint(src + length, width - length + 1, (1,), generator=gen))
        batch[r, dst : dst + length] = batch[r, src : src + length].clone()
    return batch


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer; ``<|endoftext|>`` is BOS and EOS, ``<pad>`` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=1024,
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def add_hidden_dropout(model, p: float) -> list:
    """Dropout on each attention and MLP output while training (Llama has none); returns the hook handles.

    With ~4M training tokens and ~6M parameters the model overfits within two epochs; this is the regulariser.
    Hooks leave the saved model a plain Llama.
    """
    if p <= 0:
        return []

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + output[1:]
        return torch.nn.functional.dropout(output, p, True)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(hook))
        handles.append(layer.mlp.register_forward_hook(hook))
    return handles


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """One flat stream: each text's ids preceded by ``<|endoftext|>``, as the tokenizer adds it."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _unseen_texts(cfg: PretrainConfig, heldout: list[str]) -> list[str]:
    """Text for the context gain: --unseen_path, else WikiText-2 valid beside the corpus, else the held-out slices
    (cut into 2,000-character pieces either way, so windows come from many places)."""
    path = Path(cfg.unseen_path) if cfg.unseen_path else Path(cfg.data_dir) / "wikitext-2" / "valid.txt"
    if not path.is_file():
        return heldout
    text = read_text_file(path)
    return [text[i : i + 2000] for i in range(0, len(text), 2000)]


def _lr_at(step: int, cfg: PretrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``, paced by steps or, with a time budget, by whichever of
    steps and seconds runs out first (so a run stopped by ``max_seconds`` still ends at the low learning rate)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# Settings that may change between the calls of one resumed run; any other difference is refused.
_RESUMABLE = {"output_dir", "data_dir", "max_steps", "max_seconds", "session_seconds", "eval_every", "resume_dir",
              "compile", "unseen_path"}


def _save_train_state(folder: Path, model, opt, gen: torch.Generator, tokenizer, cfg: PretrainConfig, step: int,
                      elapsed: float, history: list) -> None:
    """Write the state to ``folder`` as a whole: into ``folder.tmp`` first, then swapped in."""
    import shutil

    from safetensors.torch import save_file, save_model

    from sdgrpo import checkpointing as checkpoint_state

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # fp32, tied weights once
    checkpoint_state.save_optimizer(opt.state_dict(), tmp)
    checkpoint_state.save_rng(tmp)
    save_file({"sampler": gen.get_state()}, str(tmp / "sampler.safetensors"))
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "train_state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed, "history": history,
                                                      "config": asdict(cfg)}, indent=2))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _state_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder.with_name(folder.name + ".old")):  # .old: a swap cut short
        if (candidate / "train_state.json").is_file():
            return candidate
    return None


def _check_resumable(saved: dict, cfg: PretrainConfig, folder: Path) -> None:
    from sdgrpo.errors import UserError

    now = asdict(cfg)
    changed = sorted(k for k in now if k not in _RESUMABLE and saved.get(k) != now[k])
    if changed:
        raise UserError(f"{folder}: the saved run differs in {', '.join(changed)}; continue it with the same "
                        "settings or pass another --resume_dir")


def main(cfg: PretrainConfig) -> dict:
    """Train tokenizer and model, evaluate held-out bits per byte, save a `from_pretrained` folder."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = load_corpus(cfg.data_dir, cfg.heldout_fraction)
    train_texts = [t for _, t, _ in corpus]
    heldout_texts = [h for _, _, h in corpus]
    t0 = time.time()
    state = _state_folder(Path(cfg.resume_dir)) if cfg.resume_dir else None
    saved = json.loads((state / "train_state.json").read_text()) if state else None
    if saved:
        _check_resumable(saved["config"], cfg, state)
    tokenizer_path = state / "tokenizer" if saved else cfg.tokenizer_path
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_ids = encode_documents(tokenizer, train_texts)
    model = build_model(cfg, tokenizer).to(device)
    hooks = add_hidden_dropout(model, cfg.hidden_dropout)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tokenizer %.1fs; %d training tokens; %d parameters", time.time() - t0, len(train_ids), n_params)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history, start_step, elapsed_before = [], 0, 0.0
    if saved:
        from safetensors.torch import load_file, load_model

        from sdgrpo import checkpointing as checkpoint_state

        load_model(model, str(state / "model.safetensors"), device=str(device))
        opt.load_state_dict(checkpoint_state.load_optimizer(state))
        checkpoint_state.load_rng(state)
        gen.set_state(load_file(str(state / "sampler.safetensors"))["sampler"])
        history, start_step, elapsed_before = saved["history"], saved["step"], saved["elapsed_s"]
        logger.info("continuing %s from step %d (%.0f s trained)", state, start_step, elapsed_before)
    step_fn = torch.compile(model) if cfg.compile else model
    device_ids, window = train_ids.to(device), torch.arange(cfg.seq_len + 1, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.time()
    steps_done = start_step

    def save_state():
        if cfg.resume_dir:
            _save_train_state(Path(cfg.resume_dir), model, opt, gen, tokenizer, cfg, steps_done,
                              elapsed_before + time.time() - t0, history)

    for step in range(start_step, cfg.max_steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg, elapsed_before + time.time() - t0)
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = device_ids[starts.to(device)[:, None] + window]  # rows train_ids[s : s + seq_len + 1]
        if cfg.repeat_fraction > 0:
            batch = add_repeats(batch, cfg, gen)
        with amp:
            loss = step_fn(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps_done = step + 1
        elapsed = elapsed_before + time.time() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            with amp:
                bpb, _ = evaluate_bpb(model, tokenizer, heldout_texts, cfg.seq_len, device)
            induction = induction_score(model, tokenizer, heldout_texts, 60, 16)
            history.append({"step": step + 1, "train_loss": loss.item(), "heldout_bpb": bpb, "elapsed_s": elapsed,
                            "induction_60": induction})
            logger.info("step %d loss %.3f held-out bpb %.4f induction %.2f (%.0fs)", step + 1, loss.item(), bpb,
                        induction, elapsed)
            if step + 1 < cfg.max_steps:
                save_state()
        if cfg.max_seconds and elapsed > cfg.max_seconds:
            logger.warning("time budget of %.0f s reached at step %d: stopping", cfg.max_seconds, step + 1)
            history.append({"step": step + 1, "train_loss": loss.item(), "stopped_by_time": True,
                            "elapsed_s": elapsed})
            break
        if cfg.session_seconds and time.time() - t0 > cfg.session_seconds:
            logger.warning("this call's %.0f s reached at step %d: stopping; continue with the same --resume_dir",
                           cfg.session_seconds, step + 1)
            history.append({"step": step + 1, "train_loss": loss.item(), "stopped_for_this_call": True,
                            "elapsed_s": elapsed})
            break
    save_state()
    train_seconds = elapsed_before + time.time() - t0
    for handle in hooks:
        handle.remove()

    # Ship bf16 weights; the figures are those of the shipped weights, evaluated in fp32.
    model = model.to(torch.bfloat16).to(torch.float32)
    bpb, nbytes = evaluate_bpb(model, tokenizer, heldout_texts, cfg.seq_len, device)
    uni = sum(unigram_nll(train_ids, torch.tensor(tokenizer(h)["input_ids"]), len(tokenizer)) for h in heldout_texts)
    uni_bpb = uni / math.log(2) / nbytes
    unseen = _unseen_texts(cfg, heldout_texts)
    probes = probe(model, tokenizer, heldout_texts, unseen)
    logger.info("induction score %s, context gain %.3f nats/token", probes["induction_score"],
                probes["context_gain"])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    result = {
        "config": asdict(cfg),
        "parameters": n_params,
        "training_tokens": len(train_ids),
        "heldout_bytes": nbytes,
        "heldout_bpb": bpb,
        "unigram_bpb": uni_bpb,
        "ratio_to_unigram": bpb / uni_bpb,
        **probes,
        "unseen_text": cfg.unseen_path or ("wikitext-2/valid.txt" if unseen is not heldout_texts else "held-out"),
        "steps": steps_done,
        "train_seconds": train_seconds,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "history": history,
    }
    (out / "pretrain_result.json").write_text(json.dumps(result, indent=2))
    return result
