"""Loading a causal LM and its tokenizer safely (transformers + PEFT backend).

Safe by default: ``trust_remote_code`` only when asked, safetensors only. A hub name or a local folder both work;
with ``HF_HUB_OFFLINE=1`` only the local cache is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sdgrpo.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """``auto``/None: bf16 on a GPU that supports it, else fp32."""
    if name in (None, "auto"):
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def choose_attention_kernels(cudnn: bool) -> None:
    """Allow or forbid cuDNN among the kernels of PyTorch's SDPA for this process (``--cudnn_attention``). Forbidden,
    masked attention runs PyTorch's memory-efficient kernel, which needs no per-shape plan."""
    torch.backends.cuda.enable_cudnn_sdp(cudnn)


def check_model_path(name_or_path: str) -> None:
    """A local path must be a model folder; anything else is taken as a hub name."""
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise UserError(f"{name_or_path}: no such model folder")
        if not (path / "config.json").is_file():
            raise UserError(f"{name_or_path}: not a model folder (no config.json); pass a folder saved with "
                            "save_pretrained or a hub name")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def require_4bit(where: str, device: str) -> None:
    """4-bit loading needs a CUDA device and bitsandbytes: one line naming ``where`` otherwise."""
    if device != "cuda":
        raise UserError(f"{where}: 4-bit loading needs a CUDA GPU (bitsandbytes); drop the 4-bit option")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f'{where}: 4-bit loading needs bitsandbytes: pip install -e ".[qlora]" (or pip install '
                        'bitsandbytes)') from None


def load_model(name_or_path: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False,
               attn_implementation: str | None = None, load_in_4bit: bool = False, quant_type: str = "nf4",
               double_quant: bool = False):
    """A causal LM from safetensors weights only; ``load_in_4bit`` quantises it to 4 bits (bitsandbytes, CUDA only;
    ``quant_type`` nf4 or fp4, ``double_quant``: its scales quantised too), computing in ``dtype``."""
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path)
    extra = {}
    if load_in_4bit:
        require_4bit(name_or_path, device)
        from transformers import BitsAndBytesConfig

        extra = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                           bnb_4bit_use_double_quant=double_quant,
                                                           bnb_4bit_compute_dtype=dtype),
                 # this process's GPU: under accelerate / torchrun each process loads its own copy on its LOCAL_RANK
                 # (accelerate's PartialState().local_process_index reads the same variable)
                 "device_map": {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            **extra,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{name_or_path}: cannot load the model ({str(err).splitlines()[0]})") from None
    return model if load_in_4bit else model.to(device)
