"""gemlite configurations tuned for the projections the engine decodes, per card, loaded over gemlite's own.

gemlite ships tuned kernel configurations per card (``gemlite/configs/<card>.json``, read at its import; the
Qwen2.5-7B widths are in its H100 file). ``benchmarks/tune_gemlite.py`` times its split-K kernel for a model's
projections at the engine's row counts, from gemlite's shipped configuration through a coordinate search, and writes
the configurations that beat it as a file of gemlite's format; those shipped here
(``sdgrpo/assets/gemlite/<card>.json``, each with the results file that measured it) are added to gemlite's table
(``GemLiteLinear.load_config``, which updates it entry by entry) the first time the engine makes a gemlite copy.
Entries for other shapes and cards stay gemlite's. ``ENABLED = False`` (bench_step's ``+shippedcfg``) keeps gemlite's
own.

Shadowed upstream behaviour (gemlite 0.6, which imports only with CUDA: pinned by the tuned-configuration test in
tests/gpu/test_gpu.py): ``GemLiteLinear.load_config`` and the table ``gemlite.core.GEMLITE_TRITON_CONFIG_CACHE`` its
kernels' pruners read, keyed by kernel type and ``str((M bucket, N, K, group, values a word, type id))``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

FOLDER = Path(__file__).resolve().parent.parent / "assets" / "gemlite"
ENABLED = True
KEYS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "SPLIT_K", "A_load_order", "num_warps",
        "num_stages"}
_loaded: dict[str, str | None] = {}


def file_for(device_name: str, folder: Path | None = None) -> Path | None:
    """The shipped file for a card named ``device_name`` (torch's name): the longest file tag in the name, lowered and
    with spaces as underscores, as gemlite picks its own (``h100`` in ``NVIDIA H100 80GB HBM3``); None if none.
    ``folder``: :data:`FOLDER` (the shipped files) unless given."""
    folder = FOLDER if folder is None else folder
    name = device_name.lower().replace(" ", "_")
    tags = sorted((p.stem for p in folder.glob("*.json")), key=len, reverse=True)
    return next((folder / f"{tag}.json" for tag in tags if tag in name), None)


def signature_key(signature: str) -> tuple:
    """A gemlite table key, ``"(8, 37888, 3584, 64, 8, 104)"``, as the tuple it was written from."""
    return tuple(json.loads(signature.replace("(", "[").replace(")", "]")))


def check(table: dict) -> None:
    """Raises ValueError unless ``table`` is a gemlite config table whose every entry has the keys its pruner reads."""
    for kind, entries in table.items():
        for signature, config in entries.items():
            key = signature_key(signature)
            if len(key) != 6 or not all(isinstance(v, int) for v in key):
                raise ValueError(f"{kind} {signature}: not a gemlite signature (M, N, K, group, per word, type)")
            missing = KEYS - set(config)
            if missing:
                raise ValueError(f"{kind} {signature}: missing {sorted(missing)}")


def load(device_name: str) -> str | None:
    """Adds the tuned configurations for this card to gemlite's table, once a process; the file's name, or None."""
    if not ENABLED:
        return None
    if device_name in _loaded:
        return _loaded[device_name]
    path = file_for(device_name)
    _loaded[device_name] = None
    if path is not None:
        from gemlite import GemLiteLinear

        check(json.loads(path.read_text()))
        if GemLiteLinear.load_config(str(path)):
            _loaded[device_name] = path.name
            logger.info("gemlite: configurations tuned for %s loaded (%s)", device_name, path.name)
    return _loaded[device_name]
