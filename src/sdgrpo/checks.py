"""The checks every verb's options pass before any work starts: numeric ranges and choices, kinds of path, files
that must exist, what the machine must have, what the model's own files allow.

:func:`sdgrpo.args.parse_args` runs :func:`check_options` on the parsed values of every verb, so a bad value is one
line naming the option, what it must be and what was given (exit 2), before a model is loaded or a file written,
instead of a traceback from deep inside transformers, or a value taken silently (a negative temperature samples
from the reversed distribution). :data:`OPTIONS` is the one table of those rules: an option's rule applies to every
verb that has an option of that name; ``Class.option`` keys (any class in the config's MRO) apply to one verb only.
Options inherited from TRL and transformers are in the table where upstream takes a bad value silently or refuses
it only once training runs; those upstream refuses while the config is built are in :data:`UNCHECKED`, with every
option no range applies to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdgrpo.errors import UserError


@dataclass(frozen=True)
class Rule:
    """What an option's value must be: ``what`` completes "must be ..." (or a function that returns it, for choices
    that need an import to list), ``test`` takes the parsed value (never None: an option left unset is not
    checked), ``bad`` is a value the rule refuses (tests walk the table with it)."""

    what: str | Callable[[], str]
    test: Callable[[Any], bool]
    bad: Any

    def describe(self) -> str:
        return self.what() if callable(self.what) else self.what


def at_least(n: int) -> Rule:
    return Rule(f"at least {n}", lambda v: v >= n, n - 1)


def one_of(*choices: str, lazy: Callable[[], tuple] | None = None) -> Rule:
    """A choice among ``choices``, or among those ``lazy`` returns (imported only when a value is checked)."""
    listed = lazy or (lambda: choices)
    return Rule(lambda: f"one of {', '.join(listed())}", lambda v: str(v) in listed(), "typo")


def _temperatures(value: str) -> bool:
    try:
        temps = [float(t) for t in str(value).split(",") if t.strip()]
    except ValueError:
        return False
    return bool(temps) and all(t > 0 for t in temps)


AT_LEAST_1 = at_least(1)
AT_LEAST_0 = Rule("0 or more", lambda v: v >= 0, -1)
POSITIVE = Rule("above 0", lambda v: v > 0, 0)
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1, 1)
UNIT = Rule("in [0, 1]", lambda v: 0 <= v <= 1, 1.5)
PROBABILITY_MASS = Rule("in (0, 1]", lambda v: 0 < v <= 1, 0)
SEED = Rule("in [0, 2**32 - 1] (the seeds numpy takes)", lambda v: 0 <= v < 2**32, -1)
PORT = Rule("a port number, 1-65535", lambda v: 1 <= v <= 65535, 0)
STEPS = Rule("at least 1, or -1 (train for num_train_epochs)", lambda v: v == -1 or v >= 1, 0)
TEMPERATURES = Rule("comma-separated numbers, each above 0", _temperatures, "1.0,-0.5")
RATIO_CAP = Rule("at least 1 (a token the sampler and the policy agree on has ratio 1)", lambda v: v >= 1, 0.5)
BACKENDS = ("hf", "unsloth")
SWITCH = Rule("one of auto, true, false", lambda v: str(v).lower() in ("auto", "true", "false"), "typo")


def _rewards() -> tuple:
    from sdgrpo.rewards import REWARDS

    return tuple(REWARDS)


def _caches() -> tuple:
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

    return tuple(ALL_CACHE_IMPLEMENTATIONS)


# option (or Class.option) -> rule; the one table of what every verb's options must be (see the module docstring)
OPTIONS: dict[str, Rule] = {
    **dict.fromkeys((
        # batches, lengths, counts
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "eval_accumulation_steps", "save_total_limit", "dataloader_prefetch_factor", "ddp_bucket_cap_mb", "ddp_timeout",
        "max_completion_length", "max_prompt_length", "max_length", "max_new_tokens", "pad_to_multiple_of",
        "generation_batch_size", "steps_per_generation", "num_iterations", "ref_model_sync_steps",
        "max_tool_calling_iterations", "vllm_max_model_length", "vllm_tensor_parallel_size", "dataset_num_proc",
        "num_samples", "samples", "eval_samples", "max_prompts", "max_train_prompts", "heldout_eval_prompts",
        "prompts_per_step", "reward_token_budget", "guard_patience", "lora_r", "min_prompt_tokens", "max_prompt_tokens",
        "continuation_tokens", "replay_samples", "replay_tokens",
        # the tiny model's pretraining
        "seq_len", "batch_size", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "eval_every", "repeat_min_tokens", "repeat_max_tokens",
        "DemoConfig.max_steps", "PretrainConfig.max_steps"), AT_LEAST_1),
    **dict.fromkeys(("num_generations", "num_generations_eval"), Rule(
        "at least 2 completions per prompt (GRPO compares them)", lambda v: v >= 2, 1)),
    "max_steps": STEPS,
    **dict.fromkeys(("seed", "data_seed"), SEED),
    **dict.fromkeys(("vllm_server_port", "vllm_group_port"), PORT),
    "local_rank": Rule("-1 or a process index (the launcher sets it)", lambda v: v >= -1, -2),
    **dict.fromkeys((
        "warmup_steps", "weight_decay", "adam_epsilon", "max_grad_norm", "neftune_noise_alpha", "eval_delay",
        "dataloader_num_workers", "router_aux_loss_coef", "beta", "top_k", "num_completions_to_print",
        "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef_delta", "entropy_target",
        "sequence_advantage_weight", "distill_topk", "distill_topk_weight", "heldout_eval_steps",
        "guard_max_heldout_increase", "guard_max_seq_rep_increase", "min_completion_length", "min_continuation_tokens",
        "max_delta", "max_seconds", "session_seconds"), AT_LEAST_0),
    **dict.fromkeys((
        "num_train_epochs", "learning_rate", "logging_steps", "save_steps", "eval_steps", "temperature",
        "repetition_penalty", "epsilon", "epsilon_high", "sapo_temperature_neg", "sapo_temperature_pos",
        "vllm_server_timeout", "off_policy_mask_threshold", "lora_alpha", "generation_memory_gib"), POSITIVE),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "label_smoothing_factor", "lora_dropout", "test_size",
                     "hidden_dropout", "attention_dropout", "heldout_fraction", "repeat_fraction", "replay_share"),
                    FRACTION),
    **dict.fromkeys(("min_p", "ref_model_mixup_alpha", "top_entropy_quantile", "guard_max_distinct2_drop",
                     "guard_min_length_fraction", "vllm_importance_sampling_clip_min", "kd_weight", "min_lr_ratio"),
                    UNIT),
    **dict.fromkeys(("top_p", "vllm_gpu_memory_utilization"), PROBABILITY_MASS),
    **dict.fromkeys(("vllm_importance_sampling_clip_max", "vllm_importance_sampling_cap"), RATIO_CAP),
    "delta": Rule("above 1 (TRL recommends above 1 + epsilon)", lambda v: v > 1, 1),
    "reward_weights": Rule("one number: sdgrpo trains with one reward", lambda v: len(v) == 1, [1.0, 1.0]),
    **dict.fromkeys(("temperatures", "baseline_temperatures"), TEMPERATURES),
    # choices: TRL's modes (it refuses a typo only when training reaches it), sdgrpo's own
    # (SFTConfig's loss_type, truncation_mode, packing_strategy are Literals: argparse lists their choices)
    "GRPOConfig.loss_type": one_of("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    "scale_rewards": one_of("group", "batch", "none"),
    "importance_sampling_level": one_of("token", "sequence"),
    "multi_objective_aggregation": one_of("sum_then_normalize", "normalize_then_sum"),
    "vllm_mode": one_of("server", "colocate"),
    "vllm_model_impl": one_of("vllm", "transformers"),
    "vllm_importance_sampling_mode": one_of("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    "cache_implementation": one_of(lazy=_caches),
    "lora_task_type": one_of("CAUSAL_LM"),
    "ModelConfig.dtype": one_of("auto", "bfloat16", "float16", "float32"),
    "ExportConfig.dtype": one_of("float32", "bfloat16", "float16"),
    "backend": one_of(*BACKENDS),
    "reward": one_of(lazy=_rewards),
    "reward_aggregation": one_of("mean", "sum"),
    "score_with": one_of("base", "policy"),
    "collapse_guard": one_of("restore", "stop", "warn", "off"),
    "advantage": one_of("sequence", "token"),
    "generation_weights": one_of("auto", "model", "int4"),
    "rollout_correction_mode": one_of("auto", "trl", "token_truncate", "token_mask", "sequence_truncate",
                                      "sequence_mask"),
    "generation_int4_kernel": one_of("auto", "gemlite", "tinygemm"),
    "offload_activations": one_of("auto", "true", "false"),
    "tile_mlp": one_of("auto", "true", "false"),
    "gpu_memory_gib": POSITIVE,
    **dict.fromkeys(("rollout_correction", "reuse_reference_logprobs"), SWITCH),
}
# Numeric options without a rule here, and why (tests/test_checks.py holds every verb's numeric options to the two).
UNCHECKED = {
    "torch_empty_cache_steps": "transformers refuses a value below 1 while the config is built",
    "entropy_coef": "a negative coefficient penalises entropy, which a run may want",
    "entropy_coef_min": "the bound of entropy_coef, of either sign",
    "entropy_coef_max": "the bound of entropy_coef, of either sign",
}


def rules_for(classes) -> dict[str, Rule]:
    """The rule of every option of ``classes`` (a verb's config classes) that :data:`OPTIONS` constrains."""
    import dataclasses

    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            for key in [f"{base.__name__}.{f.name}" for base in cls.__mro__] + [f.name]:
                if key in OPTIONS:
                    out.setdefault(f.name, OPTIONS[key])
                    break
    return out


# Folders a verb writes into (an existing file there is refused), and files it writes (an existing folder is, and a
# missing folder to write them in).
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
ADAPTERS = {"EvalConfig": ("adapter",), "ExportConfig": ("adapter",), "GenerateConfig": ("adapter",),
            "SDGRPOConfig": ("teacher_adapter",)}
# Model options: checked only where the value is written as a local path (a hub name is checked when loaded).
MODEL_PATHS = ("model_name_or_path", "teacher_model_name_or_path", "tokenizer_path", "model")
MODEL_FOLDERS = ("model_name_or_path", "teacher_model_name_or_path")  # a local one holds config.json


def _local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def _fail(source: str, name: str, message: str):
    raise UserError(f"{source}: --{name} {message}")


def check_options(values: dict, classes, source: str) -> None:
    """Raise :class:`UserError` for the first option in ``values`` (a verb's parsed options, by name) that breaks its
    rule in :data:`OPTIONS`, or a combination of options that cannot work (:func:`check_combinations`)."""
    for name, rule in rules_for(classes).items():
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan fails every range; inf would pass some
            _fail(source, name, f"must be a finite number, not {value}")
        try:
            good = rule.test(value)
        except TypeError:  # a value of a type the rule does not take (argparse checked the option's own type)
            good = False
        if not good:
            shown = " ".join(map(str, value)) if isinstance(value, list) else (
                repr(value) if isinstance(value, str) else value)
            _fail(source, name, f"must be {rule.describe()}, not {shown}")
    check_combinations(values, source)


def check_combinations(values: dict, source: str) -> None:
    """Options that are each in range but do not work together, known before anything loads."""
    share = values.get("replay_share")
    if share:
        if "reward" in values and values["reward"] != "distill":
            _fail(source, "replay_share", f"{share:g} needs --reward distill (the replay rows' teacher is the base in "
                  f"place of the distilled teacher), not {values['reward']!r}; drop --replay_share or distill")
        for option in ("packing", "padding_free"):
            if values.get(option):
                _fail(source, "replay_share", f"{share:g} with --{option} true: the replay rows would be joined to "
                      f"the domain rows in one sequence and lose their own loss; drop --{option}")
        if "reward" not in values and (values.get("loss_type", "nll") != "nll" or values.get("label_smoothing_factor")):
            _fail(source, "replay_share", f"{share:g}: sft computes its own loss with replay rows; drop --loss_type "
                  f"{values.get('loss_type')} and --label_smoothing_factor")
    if values.get("offload_activations") == "true":
        if values.get("backend") == "unsloth":
            _fail(source, "offload_activations", "true with --backend unsloth: Unsloth offloads with its own "
                  "gradient checkpointing already; leave it auto")
        if values.get("gradient_checkpointing") is False:
            _fail(source, "offload_activations", "true with --gradient_checkpointing false: only checkpointed layer "
                  "inputs are offloaded; turn checkpointing on or leave it auto")
    penalty = values.get("repetition_penalty")
    if penalty not in (None, 1, 1.0) and "generation_engine" in values:
        from sdgrpo.runtime import engine_decodes

        if engine_decodes(values):
            _fail(source, "repetition_penalty", f"{penalty:g}: the decoding engine does not apply a repetition "
                  "penalty (every rollout would go to transformers' generate, without the engine's speed or its "
                  "log-probs); pass --generation_engine false to sample with generate, which applies it")


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
    without ``adapter_config.json``, a local model path that does not exist or (a model's) holds no config.json, a
    reward that needs a teacher without one, a hub name that cannot load here (:func:`sdgrpo.modeling.hub_problem`)."""
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
            if not path.parent.is_dir():
                _fail(source, name, f"{value}: there is no folder {path.parent} to write it in; create it first")
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
        if name in MODEL_FOLDERS and isinstance(value, str) and value and Path(value).is_dir():
            from sdgrpo.modeling import check_model_path  # what the loader refuses, refused before any work

            try:
                check_model_path(value)
            except UserError as err:
                _fail(source, name, str(err))
    if values.get("reward") in ("teacher_nll", "distill") and not (values.get("teacher_model_name_or_path")
                                                                   or values.get("teacher_adapter")):
        _fail(source, "reward", f"{values['reward']} needs a teacher: pass --teacher_adapter (an adapter on the base, "
              "e.g. the output folder of `sdgrpo sft`) or --teacher_model_name_or_path")
    probed = set()
    for name in MODEL_PATHS:
        value = values.get(name)
        if isinstance(value, str) and value and not _local(value) and value not in probed:
            from sdgrpo.modeling import hub_problem

            probed.add(value)
            if problem := hub_problem(value):
                _fail(source, name, problem)


def check_machine(configs) -> None:
    """Raise :class:`UserError` where the options ask for a quantisation sdgrpo does not train, or for what this
    machine lacks, before any work (preparing a folder of text can take minutes): 8-bit bases, 4-bit bases with
    every weight trained (``--use_peft false``); a CUDA GPU for ``--backend unsloth``, a CUDA GPU and bitsandbytes
    for a base or teacher loaded in 4 bits; gemlite and a GPU it runs on for ``--generation_int4_kernel gemlite``.
    The loaders check the machine again (modeling.require_4bit,
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
    _check_loggers(values.get("report_to"))
    if values.get("generation_int4_kernel") == "gemlite":
        from sdgrpo.engine import gemlite_available

        reason = gemlite_available()
        if reason is not None:
            raise UserError(f"--generation_int4_kernel gemlite: {reason}; use --generation_int4_kernel tinygemm or "
                            "auto")


def _check_loggers(report_to) -> None:
    """``--report_to``: loggers transformers knows and this machine has (its lists), before the text is prepared."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in (n for n in names if n not in ("all", "none")):
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"--report_to {name}: not a logger transformers knows; pass one of "
                            f"{', '.join(INTEGRATION_TO_CALLBACK)}, or none")
        if name not in get_available_reporting_integrations():
            raise UserError(f"--report_to {name}: its package is not installed here; install it, or pass one of "
                            f"{', '.join(get_available_reporting_integrations()) or 'none'} (or none)")


def check_generation_memory(train_cfg, model_cfg, config) -> None:
    """Raise :class:`UserError` where ``--generation_memory_gib`` is below the decoding engine's KV cache for the
    settings (``engine.budget.cache_bytes``: the rows TRL generates at once, per_device_train_batch_size x
    steps_per_generation, at max_prompt_length + max_completion_length positions rounded up to the engine's length
    bucket, in the dtype the model loads in), naming the smallest value that works. ``config``: the model's (None:
    not checked). The engine checks each call again, from the prompts it gets."""
    import inspect
    import math
    from types import SimpleNamespace

    budget = train_cfg.generation_memory_gib
    lengths = (train_cfg.max_prompt_length, train_cfg.max_completion_length)
    if budget is None or config is None or None in lengths:
        return
    from sdgrpo.runtime import engine_decodes

    if not engine_decodes(vars(train_cfg)):
        return
    import torch

    from sdgrpo.engine import DecodeEngine, cache_bytes
    from sdgrpo.modeling import resolve_dtype

    bucket = inspect.signature(DecodeEngine).parameters["length_bucket"].default
    rows = train_cfg.per_device_train_batch_size * train_cfg.steps_per_generation
    length = -(-sum(lengths) // bucket) * bucket
    dtype = resolve_dtype(model_cfg.dtype, "cpu" if train_cfg.use_cpu else "cuda")
    # cache_bytes reads a model's config and its parameters' dtype: both are known without loading it
    shape = SimpleNamespace(config=config, parameters=lambda: iter([torch.empty(0, dtype=dtype)]))
    need = cache_bytes(shape, rows, length) / 2**30
    if budget < need:
        digits = 2 - math.floor(math.log10(need))  # three significant digits, rounded up
        smallest = math.ceil(need * 10**digits) / 10**digits
        raise UserError(f"--generation_memory_gib {budget:g}: decoding {rows} rows of {length} positions "
                        f"(max_prompt_length {lengths[0]} + max_completion_length {lengths[1]}, rounded up to "
                        f"{bucket}) needs {need:.3g} GiB for the KV cache alone; pass --generation_memory_gib "
                        f"{smallest:g} or more, fewer rows or positions, or leave it unset to decide from the device")
