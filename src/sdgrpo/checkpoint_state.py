"""Optimizer, scheduler and RNG state in safetensors + JSON instead of transformers' torch pickles.

transformers' Trainer saves these with ``torch.save`` (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``). sdgrpo
writes ``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json`` and ``rng_state[_R].safetensors`` +
``rng_state[_R].json``, so no checkpoint that sdgrpo writes holds a pickle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_optimizer(state_dict: dict, folder: str | Path) -> None:
    tensors, meta = {}, {"param_groups": _jsonable(state_dict["param_groups"]), "state": {}}
    for pid, entries in state_dict["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(pid)][key] = {"tensor": f"{pid}/{key}"}
            else:
                meta["state"][str(pid)][key] = {"value": _jsonable(value)}
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    (Path(folder) / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(folder: str | Path) -> dict:
    tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
    meta = json.loads((Path(folder) / "optimizer.json").read_text())
    state = {int(pid): {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()}
             for pid, entries in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_scheduler(state_dict: dict, folder: str | Path) -> None:
    (Path(folder) / "scheduler.json").write_text(json.dumps(_jsonable(state_dict)))


def load_scheduler(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "scheduler.json").read_text())


def _rng_name(rank: int | None) -> str:
    return "rng_state" if rank is None else f"rng_state_{rank}"


def save_rng(folder: str | Path, rank: int | None = None) -> None:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    save_file(tensors, str(Path(folder) / f"{_rng_name(rank)}.safetensors"))
    (Path(folder) / f"{_rng_name(rank)}.json").write_text(json.dumps(meta))


def load_rng(folder: str | Path, rank: int | None = None) -> bool:
    """Restore the RNG states saved by :func:`save_rng`; False when the files are not there."""
    path = Path(folder) / f"{_rng_name(rank)}.json"
    if not path.is_file():
        return False
    meta = json.loads(path.read_text())
    tensors = load_file(str(Path(folder) / f"{_rng_name(rank)}.safetensors"))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.random.set_rng_state_all(cuda)
    return True
