"""transformers' own forwards and classes, recorded before a patching library (Unsloth) replaced them, and put back
for the duration of an engine call.

A patching library replaces transformers' module forwards with its own (at import and at load, on the classes and on
module instances; :data:`PATCHING_LIBRARIES`), which the engine's swaps of projections and its static cache cannot be
trusted through. backends/unsloth.py records the model's modeling module before it imports Unsloth
(:func:`remember_originals`); :func:`originals_put_back` then runs the patched model on transformers' forwards and
modules for the call and puts every patch back after it, errors included. A model that was not patched is not
changed. A patch without a recorded original sends the call to ``generate`` (support.py's ``unsupported`` names it).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import weakref

import torch

# Libraries that replace transformers' module forwards with their own (Unsloth: at import and at load, on the classes
# and on module instances), which the engine's swaps of projections and its static cache cannot be trusted through.
PATCHING_LIBRARIES = ("unsloth", "unsloth_zoo")


def _patching(package: str) -> bool:
    """Whether top-level ``package`` is a patching library's: one of :data:`PATCHING_LIBRARIES`, or a module that one
    generated (unsloth_zoo's compiler writes rewritten modeling code as ``unsloth_compiled_module_<model>`` modules in
    ``unsloth_compiled_cache``, imported under those names)."""
    return package in PATCHING_LIBRARIES or package.startswith(("unsloth_compiled_module", "unsloth_compiled_cache"))


def _patched_forward(model) -> str | None:
    """The qualified name of the first forward of ``model`` or its modules that a :data:`PATCHING_LIBRARIES`
    library defined (on the class or the instance), or None."""
    for module in model.modules():
        forward = module.__dict__.get("forward") or type(module).forward
        if _patching(_library(forward)):
            return f"{getattr(forward, '__func__', forward).__module__}.{getattr(forward, '__name__', 'forward')}"
    return None


def _library(fn) -> str:
    """The top-level package that defined function (or bound method) ``fn``."""
    return (getattr(getattr(fn, "__func__", fn), "__module__", "") or "").split(".")[0]


# transformers' own forwards and classes of its modeling modules, recorded before a patching library replaced them
# (backends/unsloth.py records the model's module before it imports Unsloth): the engine decodes a patched model with
# them put back for the call (:func:`originals_put_back`). Unsloth replaces, for a Llama-type model: the attention,
# decoder-layer, model and causal-LM classes' forwards, the MLP instances' forwards, and the rotary embedding class
# in the modeling module (so the model's instance is Unsloth's, with another call signature).
_ORIGINAL_FORWARDS: dict[type, object] = {}  # class -> its own forward, or _INHERITED where it had none
_ORIGINAL_CLASSES: dict[str, dict[str, type]] = {}  # modeling module -> {name: class as transformers defined it}
_INHERITED = object()


def remember_originals(*modules) -> None:
    """Record the forwards and classes of transformers modeling ``modules`` as they are now (before a patch)."""
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module.__name__:
                _ORIGINAL_CLASSES.setdefault(module.__name__, {}).setdefault(name, obj)
                own = vars(obj).get("forward", _INHERITED)
                if own is _INHERITED or not _patching(_library(own)):
                    _ORIGINAL_FORWARDS.setdefault(obj, own)


def _put_back_plan(model) -> tuple[list, list, list] | str:
    """What :func:`originals_put_back` changes in ``model``: (class, forward) pairs, modules with a patched forward of
    their own, and (parent, name, patched module, transformers' class) for modules of a patching library's class;
    where something patched has no recorded original, what it is (a string)."""
    classes, instances, modules = {}, [], []
    home = sys.modules.get(type(model).__module__)
    recorded = _ORIGINAL_CLASSES.get(getattr(home, "__name__", ""), {})
    for parent in model.modules():
        # a module of a patching library's class (Unsloth's rotary embedding, whose forward is its mixin's) is
        # swapped whole for transformers' class below, from its parent: its own forwards are never called
        swapped = parent is not model and _patching(type(parent).__module__.split(".")[0])
        for cls in () if swapped else type(parent).__mro__:
            forward = vars(cls).get("forward")
            if forward is not None and _patching(_library(forward)):
                if cls not in _ORIGINAL_FORWARDS:
                    return f"{cls.__module__}.{cls.__qualname__}.forward"
                classes[cls] = _ORIGINAL_FORWARDS[cls]
        forward = parent.__dict__.get("forward")
        if forward is not None and _patching(_library(forward)) and not swapped:
            instances.append(parent)
        for name, child in parent.named_children():
            if not _patching(type(child).__module__.split(".")[0]):
                continue
            # the name under which the patch took the place of transformers' class in the modeling module
            names = [n for n, c in recorded.items() if getattr(home, n, None) is type(child) and c is not type(child)]
            if not names:
                return f"the module {name} ({type(child).__module__}.{type(child).__qualname__})"
            modules.append((parent, name, child, recorded[names[0]]))
    return list(classes.items()), instances, modules


def _original_forward(cls: type):
    """``cls``'s forward as transformers defined it, where a patch replaced it and the original was recorded."""
    for c in cls.__mro__:
        own = _ORIGINAL_FORWARDS.get(c, vars(c).get("forward", _INHERITED))
        if own is not _INHERITED:
            return own
    return cls.forward


_STAND_INS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # patched module -> transformers' instance


@contextlib.contextmanager
def originals_put_back(model):
    """For the duration, ``model`` runs transformers' own forwards and modules where a patching library replaced
    them (nothing changes in a model that was not patched). A replaced module (Unsloth's rotary embedding) gets an
    instance of transformers' class, made once per module and kept, so a captured graph's buffers stay where they
    were."""
    plan = _put_back_plan(model) if _patched_forward(model) is not None else ([], [], [])
    if isinstance(plan, str):
        raise ValueError(f"{plan}, replaced by a patching library, has no recorded original")
    classes, instances, modules = plan
    saved_classes = [(cls, vars(cls)["forward"]) for cls, _ in classes]
    saved_instances = [(m, m.__dict__["forward"]) for m in instances]
    try:
        for cls, forward in classes:
            if forward is _INHERITED:  # the patch gave the class a forward of its own; transformers' is its base's
                del cls.forward
            else:
                cls.forward = forward
        for m in instances:
            del m.forward
        for parent, name, child, cls in modules:
            if child not in _STAND_INS:
                # on its parent's device: Unsloth's rotary embedding may keep its inv_freq where it was built and
                # make cos/sin per device on the fly
                near = next(itertools.chain(parent.parameters(), child.buffers()), None)
                _STAND_INS[child] = cls(config=model.config).to(near.device if near is not None else "cpu")
            setattr(parent, name, _STAND_INS[child])
        yield
    finally:
        for parent, name, child, _ in modules:
            setattr(parent, name, child)
        for m, forward in saved_instances:
            m.forward = forward
        for cls, forward in saved_classes:
            cls.forward = forward
