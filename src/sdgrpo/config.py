"""Configuration: TRL's ``GRPOConfig`` and ``ModelConfig`` with sdgrpo's fields and defaults, YAML + CLI overrides."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import GRPOConfig, ModelConfig, SFTConfig

from sdgrpo.args import parse_args
from sdgrpo.checks import BACKENDS
from sdgrpo.errors import UserError
from sdgrpo.runtime import machine_settings

logger = logging.getLogger(__name__)

TINY_MODEL = str(Path(__file__).parent / "assets" / "tiny-llama")


def tiny_model_recipe():
    """The shipped model's pretraining recipe, ``assets/tiny-llama/pretrain.py`` (kept beside the model it makes,
    not in the library), loaded as a module once."""
    import importlib.util
    import sys

    name = "sdgrpo_tiny_model_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(TINY_MODEL) / "pretrain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TOKEN_REWARDS = ("teacher_nll", "distill", "context_distill")  # the rewards with a per-token advantage


@dataclass
class SDGRPOConfig(GRPOConfig):
    """GRPOConfig plus the data, reward and backend settings of sdgrpo; defaults that differ from TRL's at the end."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Your text: a file or folder of .txt / .md / JSON / JSONL / CSV / Parquet "
                                        "(prepared into output_dir/data), or a folder written by `sdgrpo prepare`."}
    )
    backend: str = field(default="hf", metadata={"help": f"Model backend, one of {BACKENDS}."})
    reward: str = field(default="self_nll", metadata={"help": "Reward name from sdgrpo.rewards.REWARDS."})
    reward_aggregation: str = field(
        default="mean", metadata={"help": "How token log-probs make one reward: 'mean' or 'sum'."}
    )
    reward_token_budget: int = field(
        default=16384, metadata={"help": "Padded tokens per micro-batch in the reward's own scoring pass."}
    )
    generation_engine: bool | None = field(
        default=None,
        metadata={"help": "Decode rollouts with sdgrpo's engine (static cache, one compiled step on GPU, LoRA folded "
                          "into a generation copy); false: transformers' generate (Unsloth's own under --backend "
                          "unsloth). Default: on in one process, DDP, or FSDP2 with the weights held for generation, "
                          "on either backend; off with vLLM, DeepSpeed and FSDP re-gathering the weights."},
    )
    generation_compile: bool | None = field(
        default=None,
        metadata={"help": "Generate with a static KV cache and transformers' compiled (CUDA-graph) decoding step, "
                  "which TRL turns off. Default: on for --backend hf on a GPU (one process, DDP, or FSDP2 with the "
                  "weights held for generation) and for Unsloth's model decoded by the engine; off on CPU, with "
                  "Unsloth's own generation, vLLM and DeepSpeed."},
    )
    generation_memory_gib: float | None = field(
        default=None,
        metadata={"help": "GiB the decoding engine may take beyond what is allocated (LoRA's generation copies and the "
                  "cache): LoRA is folded into copies only where they fit, else decoded unmerged (no copies). "
                  "Default: decided from the GPU's free memory under the process's cap, less a training reserve."},
    )
    generation_weights: str = field(
        default="auto",
        metadata={"help": "What the decoding engine reads: model (the model's own weights: LoRA folded in their dtype "
                  "where that fits --generation_memory_gib, else unmerged), int4 (a 4-bit copy of base + LoRA, "
                  "refreshed every generation: a quarter of the bytes per token; its rollouts are corrected, "
                  "--rollout_correction), auto (LoRA folded in the model's dtype where that fits, else unmerged; a "
                  "4-bit base: 16-bit copies of its dequantised weights + LoRA where they fit, else int4 copies "
                  "where those fit, else unmerged). On one H200 (7B shape, 8 rows) int4 "
                  "decoded a 16-bit base no faster than unmerged: int4 is for quantised bases."},
    )
    advantage: str = field(
        default="sequence",
        metadata={"help": "sequence: GRPO's advantage, one group-normalised number per completion (TRL's). token: "
                  "for the teacher-based rewards (teacher_nll, distill, context_distill), the advantage of each "
                  "completion token is log p_teacher(y_t) - log p_policy(y_t) (the policy's detached), as SDPO and "
                  "on-policy distillation use; the KL to the base is kept."},
    )
    sequence_advantage_weight: float = field(
        default=0.0,
        metadata={"help": "With --advantage token: every token's advantage plus this weight times the sequence one."},
    )
    distill_topk: int = field(
        default=0,
        metadata={"help": "K > 0: add to GRPO's loss the reverse KL from the policy to the teacher over the teacher's "
                  "top-K tokens at every completion position, plus one bucket for the rest of the vocabulary (the "
                  "vocabulary-level form of SDPO / on-policy distillation; TRL's trl.experimental.sdpo divergence), "
                  "times --distill_topk_weight. For the teacher-based rewards (teacher_nll, distill, "
                  "context_distill). The loss's pass stays TRL's fused head, whose operands sdgrpo takes chunk by "
                  "chunk (sdgrpo.chunked): no whole logits."},
    )
    distill_topk_weight: float = field(
        default=1.0, metadata={"help": "The weight of the --distill_topk term in the loss."},
    )
    replay_share: float = field(
        default=0.0,
        metadata={"help": "Self-replay (--reward distill): this share of the prompts (0 <= share < 1) are prefixes of "
                  "text the base itself wrote before training, whose teacher is the frozen base (adapters off) "
                  "instead of --teacher_adapter / --teacher_model_name_or_path: there the per-token term is "
                  "log p_base - log p_policy, the reverse KL to the base, holding the policy to what the base knew. "
                  "0: off. The samples are made once into OUTPUT_DIR/replay (sdgrpo.replay)."},
    )
    replay_samples: int = field(
        default=512, metadata={"help": "With --replay_share: how many samples the base writes (once, cached)."},
    )
    replay_tokens: int = field(
        default=128,
        metadata={"help": "With --replay_share: tokens per base sample; a replay prompt is a sample's first half."},
    )
    rollout_correction: str = field(
        default="auto",
        metadata={"help": "Correct rollouts that are not the policy bit for bit (the engine's 16-bit generation "
                  "copies, unmerged 16-bit rounding, int4 copies) by truncated importance sampling, with TRL's "
                  "semantics and "
                  "options for vLLM rollouts (--vllm_importance_sampling_mode, _clip_max, _clip_min); costs one "
                  "no-grad policy pass per generation. auto: on where the engine decodes 16-bit or int4 weights; "
                  "true, false."},
    )
    rollout_correction_mode: str = field(
        default="auto",
        metadata={"help": "Importance-sampling mode for the engine's rollouts: auto (token_truncate, whatever the "
                  "engine decodes: each token's ratio clipped at --vllm_importance_sampling_clip_max, so the weight "
                  "a batch keeps does not shrink with completion length), trl (TRL's --vllm_importance_sampling_mode, "
                  "default sequence_mask), or one of TRL's modes by name (token_truncate, token_mask, "
                  "sequence_truncate, sequence_mask). A ratio over a whole sequence is a product over its tokens: "
                  "on the shipped model with 16-bit copies (0.015-0.024 nats a token) sequence_mask kept 0.97 of "
                  "the weight at 512 tokens and 0.33 at 2048, token_truncate 1.00 (one H100, docs/LOG.md)."},
    )
    generation_int4_kernel: str = field(
        default="auto",
        metadata={"help": "The kernel that reads int4 generation copies: auto (gemlite on an H100 where installed, "
                  "else PyTorch's tinygemm), tinygemm, or gemlite (Triton, pip install gemlite; Ampere or newer). "
                  "With gemlite, --generation_weights auto gives a 4-bit base int4 copies first (docs/gpu.md)."},
    )
    hold_generation_copies: bool = field(
        default=True,
        metadata={"help": "Keep a 4-bit base's generation copies (int4 or 16-bit) allocated between generations. "
                  "false: free them after each (3.8 GiB of int4 copies on a 7B) for the training passes, at a "
                  "re-allocation and a new CUDA graph capture per generation; the memory plan still counts them."},
    )
    offload_activations: str = field(
        default="auto",
        metadata={"help": "Keep gradient checkpointing's saved layer inputs in CPU memory until the backward "
                  "(torch's save_on_cpu; sdgrpo.offload): 0.20 MB less GPU memory per training token on a 7B. "
                  "auto: on where the memory plan says the run fits only so (on a GPU, --backend hf); true; "
                  "false. --backend unsloth offloads with its own checkpointing."},
    )
    tile_mlp: str = field(
        default="auto",
        metadata={"help": "Run each layer's MLP over tiles of 1,024 tokens in the training passes, keeping only its "
                  "input for the backward and running each tile again there (sdgrpo.tiling; Arctic's and "
                  "Unsloth's tiled MLP): 0.20 MB less GPU memory per training token on a 7B, for one more MLP "
                  "forward a layer. auto: on where the memory plan says the run fits only so (after "
                  "--offload_activations); true; false. --backend unsloth uses Unsloth's own (unsloth_tiled_mlp)."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the run's memory plan (weights, LoRA and its optimizer, the engine's copies and "
                  "cache, training activations) and whether it fits the GPU (or --gpu_memory_gib), then stop: "
                  "nothing is loaded, prepared or written."},
    )
    gpu_memory_gib: float | None = field(
        default=None,
        metadata={"help": "The GPU memory this run may use: the process is capped there "
                  "(torch.cuda.set_per_process_memory_fraction), as on a card of that size, and the plan is made "
                  "for it (with --dry_run on a machine without a GPU too). Default: the whole GPU."},
    )
    memory_check: bool = field(
        default=True,
        metadata={"help": "Refuse, before loading anything, a run whose estimated peak GPU memory is above what it "
                  "may use (the estimate ran from 0.99x to 1.05x the measured peaks; false: try anyway)."},
    )
    fsdp_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Under FSDP2, keep the all-gathered weights for the whole of generation instead of "
                  "gathering every layer again at each decoding step (costs one unsharded copy of the model)."},
    )
    fsdp_skip_hooks_in_generation: bool = field(
        default=True,
        metadata={"help": "With --fsdp_gather_for_generation, run decoding steps without FSDP's per-module forward "
                  "hooks once the weights are gathered (they are put back before training)."},
    )
    reuse_reference_logprobs: str = field(
        default="auto",
        metadata={"help": "With beta > 0 and temperature 1, take the reward from the KL term's reference pass "
                  "instead of running a second forward pass: true, false, or auto (true, on either backend)."},
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Keep only the last this-many prompt tokens (TRL 1.15 dropped this option; sdgrpo "
                  "enforces it)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A separate frozen model that scores completions (rewards 'teacher_nll' and 'distill')."},
    )
    teacher_adapter: str | None = field(
        default=None,
        metadata={"help": "A LoRA adapter folder (e.g. from `sdgrpo sft` on the same text) merged into a frozen copy "
                  "of the teacher model (default: the base model itself): the teacher of 'teacher_nll' and 'distill'."},
    )
    heldout_eval_steps: int = field(
        default=0,
        metadata={"help": "Every N steps, log the policy's bits per byte on the true continuations of the prepared "
                  "'test' split (heldout/bpb). 0: off."},
    )
    heldout_eval_prompts: int = field(default=64, metadata={"help": "Test prompts used by the held-out evaluation."})
    keep_best_heldout: bool = field(
        default=False,
        metadata={"help": "Make the adapter with the lowest held-out bits per byte the final one (needs "
                  "--heldout_eval_steps)."},
    )
    guard_max_heldout_increase: float = field(
        default=0.0,
        metadata={"help": "Guard limit: held-out bits per byte may rise at most this fraction above its first "
                  "value (0: not judged)."},
    )
    teacher_load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the teacher quantised to 4-bit NF4 (bitsandbytes, CUDA GPU only) to save memory."},
    )
    teacher_retokenize: bool = field(
        default=False,
        metadata={"help": "Allow a teacher with another tokenizer (teacher_nll only): decoded text is re-tokenized, "
                  "prompt and completion separately; approximate at the boundary."},
    )
    score_with: str = field(
        default="base",
        metadata={"help": "'base': the frozen base scores (adapters disabled). 'policy': the live policy scores "
                  "itself, the failure mode the original recipe warned about (for experiments only)."},
    )
    collapse_guard: str = field(
        default="restore",
        metadata={"help": "On collapse: 'warn', 'stop', 'restore' (stop and keep the last checkpoint within "
                  "limits as the final adapter) or 'off'."},
    )
    guard_max_seq_rep_increase: float = field(
        default=0.1, metadata={"help": "Guard limit: seq-rep-4 may rise at most this much over its start value."}
    )
    guard_max_distinct2_drop: float = field(
        default=0.3, metadata={"help": "Guard limit: distinct-2 may fall at most this fraction of its start value."}
    )
    guard_min_length_fraction: float = field(
        default=0.25,
        metadata={"help": "Guard limit: the mean completion length may fall to this fraction of its start value "
                  "(catches a collapse to empty or EOS-only completions; 0 turns it off)."},
    )
    min_completion_length: int = field(
        default=0,
        metadata={"help": "Sample at least this many tokens before EOS may end a completion (transformers' "
                  "min_new_tokens). The mean log-prob reward favours short and EOS-only completions; this rules "
                  "them out. 0: off."},
    )
    guard_patience: int = field(default=2, metadata={"help": "Logged steps out of limits in a row before acting."})
    max_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N training prompts (quick runs)."}
    )
    # Defaults that differ from TRL's:
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn off dropout in the model (TRL's default is off). TRL runs the reference pass of the "
                  "KL term in train mode, so with dropout the KL and the reused reward would carry dropout noise."},
    )
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the frozen base (TRL's default is 0)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate for the LoRA weights."})
    max_completion_length: int | None = field(default=128, metadata={"help": "Maximum completion tokens."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers (TRL's report_to)."})
    output_dir: str | None = field(default="outputs/sdgrpo", metadata={"help": "Where adapters and logs go."})

    def __post_init__(self):
        # Each option's own range and choices: sdgrpo.checks.OPTIONS, checked by the parser; here what they need
        # together.
        self.reuse_reference_logprobs = str(self.reuse_reference_logprobs).lower()
        # the options that need a teacher scoring the policy's own token ids
        for option, on, why in (("--advantage token", self.advantage == "token",
                                 ": its per-token advantage is the teacher's log-prob minus the policy's"),
                                ("--distill_topk", bool(self.distill_topk), "")):
            if on and self.reward not in TOKEN_REWARDS:
                raise UserError(f"{option} needs a teacher-based reward ({', '.join(TOKEN_REWARDS)}), not "
                                f"{self.reward!r}{why}")
            if on and self.teacher_retokenize:
                raise UserError(f"{option} needs the teacher to score the policy's own token ids; drop "
                                "--teacher_retokenize (or use a teacher with the student's tokenizer)")
        self.rollout_correction = str(self.rollout_correction).lower()
        if self.min_completion_length:
            if self.max_completion_length is not None and self.min_completion_length > self.max_completion_length:
                raise UserError(f"min_completion_length {self.min_completion_length} is above max_completion_length "
                                f"{self.max_completion_length}; lower it")
            self.generation_kwargs = {**(self.generation_kwargs or {}), "min_new_tokens": self.min_completion_length}
        try:
            super().__post_init__()
        except ValueError as err:
            raise UserError(f"config: {err}") from None


@dataclass
class SDModelConfig(ModelConfig):
    """TRL's ModelConfig with LoRA on by default (r 16, all linear projections) and the shipped tiny model."""

    def __post_init__(self):
        if self.model_name_or_path in (None, "", "tiny"):
            self.model_name_or_path = TINY_MODEL
        super().__post_init__()

    model_name_or_path: str | None = field(
        default=TINY_MODEL, metadata={"help": "Hub name or local folder of the base model (default: shipped tiny)."}
    )
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters. false: train every weight (sdgrpo "
                                                   "sft only; the output folder then holds the whole model)."})
    dtype: str | None = field(
        default="auto",
        metadata={"help": "Base weights dtype: auto (bf16 on a GPU that has it, else fp32), bfloat16, float16, "
                  "float32. TRL's default, float32, doubles the frozen base's memory on a GPU."},
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules; 'all-linear' = every linear."}
    )
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Let PyTorch's SDPA use cuDNN attention on a GPU. Off by default: PyTorch 2.11 tries cuDNN "
                  "first for masked attention on H100, and cuDNN builds an execution plan for every new (batch, "
                  "length) shape, ~0.5 s forward and again backward; training batches change shape every step."},
    )


@dataclass
class SDSFTConfig(SFTConfig):
    """TRL's SFTConfig for ``sdgrpo sft``: LoRA fine-tuning on the prepared text (prompt + true continuation), the
    control every GRPO recipe is compared with."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Your text: a file or folder of .txt / .md / JSON / JSONL / CSV / Parquet "
                                        "(prepared into output_dir/data), or a folder written by `sdgrpo prepare`."}
    )
    max_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (quick runs)."}
    )
    heldout_eval_steps: int = field(
        default=0, metadata={"help": "Every N steps, log held-out bits per byte of the test split (heldout/bpb)."}
    )
    heldout_eval_prompts: int = field(default=64, metadata={"help": "Test prompts used by the held-out evaluation."})
    keep_best_heldout: bool = field(
        default=False, metadata={"help": "End with the adapter of the lowest held-out bits per byte."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate for the LoRA weights."})
    max_length: int | None = field(default=512, metadata={"help": "Longest training sequence in tokens."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers."})
    output_dir: str | None = field(default="outputs/sft", metadata={"help": "Where the adapter and logs go."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Distil a frozen teacher on the text: the loss becomes (1 - kd_weight) * cross-entropy + "
                          "kd_weight * KL(teacher || student) per token over the vocabulary. The teacher must use "
                          "the student's tokenizer."},
    )
    kd_weight: float = field(
        default=0.5, metadata={"help": "Weight of the teacher's KL term in the loss (0-1; with a teacher only)."}
    )
    replay_share: float = field(
        default=0.0,
        metadata={"help": "Self-replay: this share of every batch's rows (0 <= share < 1) is text the base itself "
                  "wrote before training, trained by KL(base || model) over the vocabulary at every position (the "
                  "base's distribution, not its sampled tokens as labels), beside the domain rows' unchanged loss: "
                  "holds the model to what the base knew. 0: off. The samples are made once into OUTPUT_DIR/replay "
                  "(sdgrpo.replay)."},
    )
    replay_samples: int = field(
        default=512, metadata={"help": "With --replay_share: how many samples the base writes (once, cached)."},
    )
    replay_tokens: int = field(default=128, metadata={"help": "With --replay_share: tokens per base sample."})

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as err:
            raise UserError(f"config: {err}") from None


def parse_train_args(argv: list[str]) -> tuple[SDGRPOConfig, SDModelConfig]:
    """The GRPO verb's configuration (see :func:`sdgrpo.args.parse_args`)."""
    return parse_args(argv, (SDGRPOConfig, SDModelConfig), "sdgrpo train", "self-distillation GRPO of LoRA adapters",
                      machine=machine_settings)


def parse_sft_args(argv: list[str]) -> tuple[SDSFTConfig, SDModelConfig]:
    """The SFT verb's configuration (see :func:`sdgrpo.args.parse_args`)."""
    return parse_args(argv, (SDSFTConfig, SDModelConfig), "sdgrpo sft", "LoRA fine-tuning on your text",
                      machine=machine_settings)


def config_to_dict(train_cfg: SDGRPOConfig, model_cfg: SDModelConfig) -> dict:
    """The resolved configuration as plain YAML-able values (what ``resolved_config.yaml`` holds)."""
    out = {}
    for cfg in (model_cfg, train_cfg):
        for f in dataclasses.fields(cfg):
            if not f.init:
                continue
            value = getattr(cfg, f.name)
            if hasattr(value, "value"):  # enums
                value = value.value
            if isinstance(value, (str, int, float, bool, type(None), list, dict)):
                out[f.name] = value
    return out
