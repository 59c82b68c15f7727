"""Loading a causal LM and its tokenizer safely (transformers + PEFT backend).

Safe by default: ``trust_remote_code`` only when asked, safetensors only. A hub name or a local folder both work;
with ``HF_HUB_OFFLINE=1`` only the local cache is used.

Before a model loads, what its own files allow is checked from them (config.json, the tokenizer, an adapter's
safetensors header; no weights): an embedding with fewer rows than the tokenizer has tokens (:func:`check_model`),
positions past its limit (:func:`check_positions`), an adapter made for another architecture or size
(:func:`check_adapter`). Each is one line (:class:`UserError`).
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
            what = "a file, not a model folder" if path.exists() else "no such model folder"
            raise UserError(f"{name_or_path}: {what}; pass a folder saved with save_pretrained, or a hub name")
        if not (path / "config.json").is_file():
            raise UserError(f"{name_or_path}: not a model folder (no config.json); pass a folder saved with "
                            "save_pretrained or a hub name")


def _hub_unreachable(endpoint: str, timeout: float) -> str | None:
    """Why a TCP connection to the Hub's host cannot be made (a name that does not resolve, refused, timed out), or
    None where it can, or where that is not known within ``timeout`` seconds in all (the name lookup has no timeout
    of its own: it runs in a thread that is left behind)."""
    import socket
    import threading
    from urllib.parse import urlparse

    try:
        url = urlparse(endpoint)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a malformed HF_ENDPOINT: huggingface_hub says so itself
        return None
    if not host:
        return None
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(err.strerror or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def hub_problem(name: str, timeout: float = 3.0) -> str | None:
    """Why the hub name ``name`` cannot load here, or None: the Hub cannot be reached (a connection to its host,
    ``timeout`` seconds at most; not known in that time counts as reachable) and the local cache holds neither its
    config.json nor a tokenizer file. Unchecked where ``HF_HUB_OFFLINE`` is set (the cache only: transformers says at
    once what it lacks) or a proxy is (huggingface_hub's requests go through it). Without this a hub name offline
    spent a minute or more in huggingface_hub's retries (a "Retrying in 8s" line each) before its error."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants, try_to_load_from_cache

    scheme = urlparse(constants.ENDPOINT).scheme
    if constants.HF_HUB_OFFLINE or getproxies().get(scheme) or getproxies().get("all"):
        return None  # behind a proxy a direct connection says nothing: huggingface_hub goes through the proxy
    reason = _hub_unreachable(constants.ENDPOINT, timeout)
    if reason is None:
        return None
    try:
        cached = any(isinstance(try_to_load_from_cache(name, f), str)
                     for f in ("config.json", "tokenizer_config.json", "tokenizer.json"))
    except ValueError:  # not a valid repository id: the loader says so
        return None
    if cached:
        logger.warning("%s: the Hugging Face Hub (%s) cannot be reached (%s): the model loads from the local cache "
                       "after huggingface_hub's retries; set HF_HUB_OFFLINE=1 to skip them", name, constants.ENDPOINT,
                       reason)
        return None
    return (f"{name}: not a local folder, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached from here "
            f"({reason}) to download it; pass a local model folder (save_pretrained, or a download made where the "
            "Hub is reachable)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({str(err).splitlines()[0]}); the folder needs its "
                        "tokenizer's files (tokenizer.json or tokenizer.model, tokenizer_config.json) as "
                        "save_pretrained writes them") from None
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


# --- what a model's own files allow, checked before it loads (config.json, the tokenizer, an adapter's files) -------
def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's configuration (its config.json, without weights), or None where it cannot be read here (a hub
    name offline, a folder that is not a model's: the loader then says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def check_model(name_or_path: str, trust_remote_code: bool = False, option: str = "--model_name_or_path"):
    """Raise :class:`UserError` where the model's embedding has fewer rows than its tokenizer has tokens (the ids
    past it would index out of the table, a device-side assert on a GPU); returns its configuration or None."""
    config = model_config(name_or_path, trust_remote_code)
    if config is None:
        return None
    rows = getattr(config.get_text_config(decoder=True), "vocab_size", None)
    tokens = len(load_tokenizer(name_or_path, trust_remote_code))
    if rows is not None and rows < tokens:
        raise UserError(f"{option} {name_or_path}: its embedding has {rows} rows but its tokenizer has {tokens} "
                        f"tokens, so ids from {rows} on would index past it; resize it (model.resize_token_embeddings"
                        "(len(tokenizer)), then save_pretrained) or pass the tokenizer it was trained with")
    return config


def position_limit(config) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    text = config.get_text_config(decoder=True)
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def check_positions(config, positions: int, what: str, name: str) -> None:
    """Raise :class:`UserError` where ``positions`` (``what``: how they add up) pass the model's position limit."""
    limit = position_limit(config) if config is not None else None
    if limit and positions > limit:
        raise UserError(f"{what} make {positions} positions, past {name}'s limit of {limit} "
                        "(max_position_embeddings); lower them")


def _features(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA wraps: Linear, transformers' Conv1D (GPT-2), Embedding (rows, width)."""
    import torch.nn as nn

    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


def _adapter_mismatch(skeleton, shapes: dict[str, list[int]]) -> str | None:
    """What in an adapter's tensors (name -> shape, as PEFT saves them) does not fit ``skeleton`` (the model on the
    meta device), or None."""
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for suffix, side in ((".lora_A.weight", 0), (".lora_B.weight", 1), (".lora_embedding_A", 0),
                             (".lora_embedding_B", 1)):
            if name.endswith(suffix):
                path = name[: -len(suffix)]
                try:
                    features = _features(skeleton.get_submodule(path))
                except AttributeError:
                    return f"it has LoRA weights for {path}, which this model does not have"
                got = shape[1] if side == 0 else shape[0]
                if features is not None and got != features[side]:
                    return (f"its LoRA on {path} takes {'inputs' if side == 0 else 'outputs'} of {got}, this "
                            f"model's layer {features[side]}")
                break
        else:
            if "lora_" in name:  # another adapter variant's tensors (DoRA's magnitudes, ...): PEFT checks them
                continue
            path = name.replace(".base_layer.", ".")  # a whole weight saved with the adapter (modules_to_save)
            try:
                want = list(skeleton.get_parameter(path).shape)
            except AttributeError:
                return f"it holds the weight {path}, which this model does not have"
            if want != list(shape):
                return f"its {path} is {'x'.join(map(str, shape))}, this model's {'x'.join(map(str, want))}"
    return None


def check_adapter(adapter: str, base: str, trust_remote_code: bool = False, option: str = "--adapter",
                  base_option: str = "--model_name_or_path") -> None:
    """Raise :class:`UserError` where the LoRA adapter folder ``adapter`` was made for another architecture or size
    than ``base``: every tensor in its adapter_model.safetensors (read from the file's header) against the layer it
    wraps in ``base`` built from its config.json on the meta device (no weights read). Not checked where the base's
    config cannot be read here or the adapter is not saved as safetensors; PEFT then checks as it loads."""
    import json

    path = Path(adapter).expanduser()
    try:
        recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{option} {adapter}: adapter_config.json cannot be read ({str(err).splitlines()[0]}); "
                        "pass a folder written by `sdgrpo train` or `sft`") from None
    weights = path / "adapter_model.safetensors"
    config = model_config(base, trust_remote_code)
    if config is None or not weights.is_file():
        return
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a model class that cannot be built bare is checked by PEFT as it loads
        return
    why = _adapter_mismatch(skeleton, shapes)
    if why:
        raise UserError(f"{option} {adapter}: made for another model than {base} ({why}; its base was "
                        f"{recorded or 'not recorded'}); pass the model it was trained on as {base_option}")
