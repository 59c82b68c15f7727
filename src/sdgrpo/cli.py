"""The ``sdgrpo`` command: parses arguments and dispatches to each verb's ``main``; nothing heavy at import."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from sdgrpo.args import parse_args
from sdgrpo.checks import check_paths
from sdgrpo.errors import UserError

logger = logging.getLogger("sdgrpo")

VERBS = {
    "prepare": "turn raw text files into a prompt dataset",
    "train": "self-distillation GRPO of LoRA adapters ([--config FILE] [--key value ...] [--resume | --start_over])",
    "sft": "LoRA fine-tuning on your text: what learns a new domain ([--config FILE] ... [--resume])",
    "eval": "compare a trained adapter with its base and with the base sampled colder (--adapter DIR --data DIR)",
    "export": "merge an adapter into its base and save a plain model folder, parity-checked (--adapter --output)",
    "generate": "sample from a base, a base + adapter (--adapter) or an exported folder (--prompt TEXT ...)",
    "demo": "prepare the shipped demo text, train the shipped tiny model on CPU, write a report",
    "pretrain": "pretrain the tiny default model (tokenizer + small Llama) on public-domain books",
}


def _prepare(argv: list[str]) -> int:
    from sdgrpo.data import PrepareConfig

    (cfg,) = parse_args(argv, (PrepareConfig,), "sdgrpo prepare", VERBS["prepare"], positional="inputs")
    if not cfg.inputs or not cfg.output:
        raise UserError("need PATH... and --output FOLDER: text files, folders (recursive) or saved datasets, and the "
                        "folder to save the dataset to")
    check_paths([cfg])

    from sdgrpo.config import TINY_MODEL
    from sdgrpo.data import prepare
    from sdgrpo.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model or TINY_MODEL)
    summary = prepare(cfg, tokenizer)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sdgrpo prepare", show_header=False)
    for key in ("documents", "files_read", "windows", "dropped_near_empty", "dropped_duplicate", "prompts", "train",
                "test"):
        table.add_row(key, str(summary[key]))
    for key in ("prompt_tokens", "continuation_tokens"):
        table.add_row(key, json.dumps(summary[key]))
    for skipped in summary["files_skipped"]:
        table.add_row("skipped", skipped)
    table.add_row("saved to", summary["config"]["output"])
    Console(stderr=False).print(table)


RUN_FLAGS = ("--resume", "--start_over")  # flags of the training verbs' command, not options of their config


def _training(verb: str, argv: list[str], parse, main) -> int:
    """``train`` and ``sft``: parse, check, run; an interrupted run says how to continue, with 128 + the signal."""
    from sdgrpo.runs import Interrupted

    cfg, model_cfg = parse([a for a in argv if a not in RUN_FLAGS])
    check_paths([cfg, model_cfg])
    from sdgrpo.progress import one_bar

    one_bar(cfg.log_level)
    _check_training_models(cfg, model_cfg)
    try:
        out = main(cfg, model_cfg, resume="--resume" in argv, start_over="--start_over" in argv)
    except Interrupted as stop:
        print(f"sdgrpo {verb}: {stop}", file=sys.stderr)
        return stop.code
    if out is not None:  # None: --dry_run
        weights = "adapter" if getattr(model_cfg, "use_peft", True) else "model"
        print(f"{weights}, resolved_config.yaml and metrics.jsonl in {out}")
    return 0


def _train(argv: list[str]) -> int:
    from sdgrpo.config import parse_train_args
    from sdgrpo.train import main

    return _training("train", argv, parse_train_args, main)


def _sft(argv: list[str]) -> int:
    from sdgrpo.config import parse_sft_args
    from sdgrpo.sft import main

    return _training("sft", argv, parse_sft_args, main)


def _export(argv: list[str]) -> int:
    from sdgrpo.export import ExportConfig, main

    (cfg,) = parse_args(argv, (ExportConfig,), "sdgrpo export", VERBS["export"])
    check_paths([cfg])
    if cfg.adapter:
        from sdgrpo.export import adapter_base

        _check_models(cfg.model_name_or_path or adapter_base(Path(cfg.adapter)), cfg.adapter, cfg.trust_remote_code)
    result = main(cfg)
    print(f"exported to {result['output']} ({result['bytes'] / 2**20:.1f} MiB, {result['seconds']} s); parity on "
          f"{result['prompts_from']}: max |delta logit| {result['max_abs_logit_delta']:.3g} (tolerance "
          f"{result['tolerance']:g}), greedy agreement {result['greedy_token_agreement']:.1%}")
    return 0


def _generate(argv: list[str]) -> int:
    from sdgrpo.generate import GenerateConfig, base_model, main

    (cfg,) = parse_args(argv, (GenerateConfig,), "sdgrpo generate", VERBS["generate"])
    check_paths([cfg])
    _check_models(base_model(cfg.model_name_or_path, cfg.adapter), cfg.adapter, cfg.trust_remote_code)
    return main(cfg)


def _eval(argv: list[str]) -> int:
    from sdgrpo.evaluate import EvalConfig, main

    (cfg,) = parse_args(argv, (EvalConfig,), "sdgrpo eval", VERBS["eval"])
    check_paths([cfg])
    from sdgrpo.config import TINY_MODEL

    _check_models(cfg.model_name_or_path or TINY_MODEL, cfg.adapter, cfg.trust_remote_code)
    result = main(cfg)
    print(result.get("verdict", "base model evaluated"))
    print(f"eval.json, frontier.png and report.md in {result['config']['output']}")
    return 0


def _check_models(model: str, adapter: str | None, trust_remote_code: bool):
    """What the files of the model a verb loads, and of the adapter it puts on it, allow (sdgrpo.modeling), before
    they load; returns the model's configuration or None."""
    if not model:
        return None
    from sdgrpo.modeling import check_adapter, check_model

    config = check_model(model, trust_remote_code)
    if adapter:
        check_adapter(adapter, model, trust_remote_code)
    return config


def _check_training_models(cfg, model_cfg) -> None:
    """``train`` and ``sft``: the base and the teacher (with ``train``'s --teacher_adapter on it), the decoding
    engine's memory budget, the completion length against the base's position limit."""
    from sdgrpo.checks import check_generation_memory
    from sdgrpo.modeling import check_adapter, check_model, check_positions

    name = model_cfg.model_name_or_path
    config = _check_models(name, None, cfg.trust_remote_code)
    teacher = cfg.teacher_model_name_or_path
    if teacher:
        check_model(teacher, cfg.trust_remote_code, "--teacher_model_name_or_path")
    if getattr(cfg, "teacher_adapter", None):
        check_adapter(cfg.teacher_adapter, teacher or name, cfg.trust_remote_code, "--teacher_adapter",
                      "--teacher_model_name_or_path")
    if hasattr(cfg, "generation_memory_gib"):
        check_generation_memory(cfg, model_cfg, config)
        if cfg.max_completion_length:
            check_positions(config, 1 + cfg.max_completion_length,
                            f"a 1-token prompt and --max_completion_length {cfg.max_completion_length}", name)


def _demo(argv: list[str]) -> int:
    from sdgrpo.demo import DemoConfig, main

    (cfg,) = parse_args(argv, (DemoConfig,), "sdgrpo demo", VERBS["demo"])
    check_paths([cfg])
    from sdgrpo.progress import one_bar

    one_bar("passive")
    return main(cfg)


def _pretrain(argv: list[str]) -> int:
    from sdgrpo.config import tiny_model_recipe

    recipe = tiny_model_recipe()
    (cfg,) = parse_args(argv, (recipe.PretrainConfig,), "sdgrpo pretrain", VERBS["pretrain"])
    check_paths([cfg])
    result = recipe.main(cfg)
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}, indent=2))
    return 0


HANDLERS = {"prepare": _prepare, "train": _train, "sft": _sft, "eval": _eval, "export": _export,
            "generate": _generate, "demo": _demo, "pretrain": _pretrain}


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so that they print now and the error stays the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """The exit code; a process of a multi-process launch ends inside (:func:`sdgrpo.runs.leave`)."""
    code = _main(argv)
    if "WORLD_SIZE" in os.environ:  # set by torchrun / accelerate launch (runs.py imports torch)
        from sdgrpo.runs import leave

        return leave(code)
    return code


def allocator_defaults(environ) -> None:
    """PyTorch's CUDA caching allocator with expandable segments (``expandable_segments:True``: a segment grows in
    place instead of a new one being split), set before CUDA starts, unless the user configured the allocator
    (``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF``). The 7B shape's 4-bit steps under a 24 GiB cap took 4.35,
    4.60, 6.23 and 6.40 s without (each later generation slower: prefill 0.1 s, then 1 s) and 4.34, 4.30, 4.37 and
    4.84 s with, the same peak (one H100, 2026-12-07, benchmarks/results/bench_step_qwen2.5-7b_h100_2026-12-07_
    expand.json); the 14B under 16 GiB ran out of memory with 1.58 GiB reserved and unallocated without it."""
    if not (environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF")):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sdgrpo {" + ",".join(VERBS) + "} ...\n")
        for verb, text in VERBS.items():
            print(f"  {verb:<9} {text}")
        return 0 if argv else 2
    if argv[0] == "--version":
        from sdgrpo import __version__

        print(f"sdgrpo {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in HANDLERS:
        print(f"sdgrpo: error: unknown command {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if sys.platform == "linux" and not os.path.exists("/dev/nvidiactl"):
        # No NVIDIA GPU here: DeepSpeed (imported by TRL where installed) would find none and print "Setting
        # accelerator to CPU. If you have GPU ..." on stdout, in every run; named, it says nothing (sdgrpo trains on
        # CUDA or the CPU only).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    allocator_defaults(os.environ)
    try:
        return HANDLERS[verb](rest)
    except UserError as err:
        _close_progress_bars()
        print(f"sdgrpo {verb}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except KeyboardInterrupt:
        print(f"sdgrpo {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
