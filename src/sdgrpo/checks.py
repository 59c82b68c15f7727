"""The checks every verb's options pass before any work starts: numeric ranges, kinds of path, files that must exist,
what the machine must have.

:func:`sdgrpo.args.parse_args` runs :func:`check_options` on the parsed values of every verb, so a bad value is one
line naming the option, what it must be and what was given (exit 2), before a model is loaded or a sample drawn,
instead of a traceback from deep inside transformers, or a value taken silently (a negative temperature samples
from the reversed distribution). A rule applies to every verb that has an option of that name.
"""

from __future__ import annotations

from pathlib import Path

from sdgrpo.errors import UserError

AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
AT_LEAST_0 = ("0 or more", lambda v: v >= 0)
POSITIVE = ("above 0", lambda v: v > 0)
FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1)
PROBABILITY_MASS = ("in (0, 1]", lambda v: 0 < v <= 1)

# option -> (what it must be, test); None values (an option left unset) are not checked
RANGES = {
    **dict.fromkeys(("max_completion_length", "max_new_tokens", "num_samples", "samples", "eval_samples",
                     "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_prompt_length", "max_prompts", "max_train_prompts", "heldout_eval_prompts",
                     "prompts_per_step", "reward_token_budget", "guard_patience", "lora_r", "min_prompt_tokens",
                     "max_prompt_tokens", "continuation_tokens", "seq_len", "batch_size", "vocab_size",
                     "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), AT_LEAST_1),
    **dict.fromkeys(("heldout_eval_steps", "min_completion_length", "min_continuation_tokens", "warmup_steps",
                     "beta", "top_k", "max_delta", "max_seconds", "session_seconds", "weight_decay"), AT_LEAST_0),
    **dict.fromkeys(("temperature", "learning_rate", "lora_alpha", "generation_memory_gib"), POSITIVE),
    **dict.fromkeys(("lora_dropout", "test_size", "hidden_dropout", "attention_dropout", "heldout_fraction",
                     "repeat_fraction"), FRACTION),
    "min_lr_ratio": UNIT,  # (kd_weight: the config's own check)
    "top_p": PROBABILITY_MASS,
}
TEMPERATURE_LISTS = ("temperatures", "baseline_temperatures")  # comma-separated, each above 0

# Folders a verb writes into (an existing file there is refused), and files it writes (an existing folder is).
OUTPUT_FOLDERS = ("output_dir",)
OUTPUT_FILES = {"GenerateConfig": ("output",)}  # elsewhere `output` is a folder
# Inputs that must exist: files, folders, either; adapters (a folder with adapter_config.json).
INPUT_FILES = ("prompts",)
INPUT_PATHS = {
    "dataset_path": "no such dataset folder or text file; pass raw text or a folder written by `sdgrpo prepare`",
    "data": "no such dataset folder; pass a folder written by `sdgrpo prepare`",
    "data_dir": "no such folder; pass --data_dir with .txt files",
    "inputs": "no such file or directory",
    "unseen_path": "no such file or directory",
}
ADAPTERS = {"EvalConfig": ("adapter",), "ExportConfig": ("adapter",)}  # generate and train check theirs as they load
# Model options: checked only where the value is written as a local path (a hub name is checked when loaded).
MODEL_PATHS = ("model_name_or_path", "teacher_model_name_or_path", "tokenizer_path", "model")


def _local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def _fail(source: str, name: str, message: str):
    raise UserError(f"{source}: --{name} {message}")


def check_ranges(values: dict, source: str) -> None:
    """Raise :class:`UserError` for the first numeric option in ``values`` (a verb's parsed options) outside its
    rule."""
    for name, (what, test) in RANGES.items():
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not test(value):
            _fail(source, name, f"must be {what}, not {value}")
    for name in TEMPERATURE_LISTS:
        value = values.get(name)
        if isinstance(value, str) and value.strip():
            try:
                temps = [float(t) for t in value.split(",") if t.strip()]
            except ValueError:
                _fail(source, name, f"must be comma-separated numbers, not {value!r}")
            if any(t <= 0 for t in temps):
                _fail(source, name, f"must all be above 0, not {value!r}")


def _option_values(configs) -> dict:
    """Every option of ``configs`` (a verb's parsed config objects) by name, the first config's value winning."""
    import dataclasses

    values = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            values.setdefault(f.name, getattr(cfg, f.name))
    return values


def check_paths(configs, source: str = "command line") -> None:
    """Raise :class:`UserError` for the first path option of ``configs`` (a verb's parsed config objects) of the
    wrong kind: an output folder that is a file (or under one), an input that does not exist, an adapter folder
    without ``adapter_config.json``, a local model path that does not exist."""
    values, names = _option_values(configs), {type(cfg).__name__ for cfg in configs}
    files_out = {n for cls in names for n in OUTPUT_FILES.get(cls, ())}
    for name in (*OUTPUT_FOLDERS, "output"):
        value = values.get(name)
        if not value:
            continue
        path = Path(value).expanduser()
        if name in files_out:
            if path.is_dir():
                _fail(source, name, f"{value} is a folder; pass the file to write")
        elif path.exists() and not path.is_dir():
            _fail(source, name, f"{value} is a file, not a folder; pass a folder to write into")
        elif any(p.exists() and not p.is_dir() for p in path.parents):
            _fail(source, name, f"{value}: a part of this path is a file; pass a folder to write into")
    for name in INPUT_FILES:
        value = values.get(name)
        if value and not Path(value).expanduser().is_file():
            _fail(source, name, f"{value}: no such file")
    for name, message in INPUT_PATHS.items():
        value = values.get(name)
        for one in value if isinstance(value, list) else [value]:
            if one and not Path(one).expanduser().exists():
                _fail(source, name, f"{one}: {message}")
    for name in {n for cls in names for n in ADAPTERS.get(cls, ())}:
        value = values.get(name)
        if value and not (Path(value).expanduser() / "adapter_config.json").is_file():
            _fail(source, name, f"{value}: no adapter_config.json there; pass the output folder of `sdgrpo train` "
                                "or `sft`")
    for name in MODEL_PATHS:
        value = values.get(name)
        if isinstance(value, str) and value and _local(value) and not Path(value).expanduser().exists():
            _fail(source, name, f"{value}: no such folder (a local path; a hub name looks like org/name)")


def check_machine(configs) -> None:
    """Raise :class:`UserError` where the options ask for a quantisation sdgrpo does not train, or for what this
    machine lacks, before any work (preparing a folder of text can take minutes): 8-bit bases, 4-bit bases with
    every weight trained (``--use_peft false``); a CUDA GPU for ``--backend unsloth``, a CUDA GPU and bitsandbytes
    for a base or teacher loaded in 4 bits. The loaders check the machine again (modeling.require_4bit,
    backends.unsloth). Run by ``sdgrpo train`` and ``sdgrpo sft`` before their text is prepared."""
    values = _option_values(configs)
    if values.get("load_in_8bit"):
        raise UserError("--load_in_8bit: sdgrpo quantises a base to 4 bits only; use --load_in_4bit true (QLoRA) or "
                        "a 16-bit base")
    if values.get("load_in_4bit") and values.get("use_peft") is False:
        raise UserError("--load_in_4bit true trains LoRA adapters on a frozen 4-bit base (QLoRA); with --use_peft "
                        "false every weight is trained, which 4-bit weights cannot be: drop one of the two")
    if values.get("backend") == "unsloth":
        from sdgrpo.backends.unsloth import require_gpu

        require_gpu()
    teacher_4bit = values.get("teacher_load_in_4bit") and not values.get("teacher_adapter") and (
        values.get("teacher_model_name_or_path") or values.get("reward") in ("teacher_nll", "distill"))
    if values.get("load_in_4bit") or teacher_4bit:
        import torch

        from sdgrpo.modeling import require_4bit

        require_4bit("--load_in_4bit" if values.get("load_in_4bit") else "--teacher_load_in_4bit",
                     "cuda" if torch.cuda.is_available() else "cpu")
