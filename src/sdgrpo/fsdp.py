"""Everything sdgrpo does to FSDP2 and to ``nn.Module`` internals, for generation only.

Private state read or changed here (pinned: torch 2.11 on the GPU machine, 2.13 on CPU; tests/test_fsdp.py runs it
on CPU and tests/test_private_api.py checks the names exist):
- ``FSDPModule._get_fsdp_state()._lazy_init()`` (a no-op once the root has run forward);
- ``FSDPModule._get_fsdp_state()._fsdp_param_groups`` (torch > 2.11) / ``._fsdp_param_group`` (torch <= 2.11), and
  each group's ``post_forward_mesh_info`` and ``is_unsharded``;
- ``nn.Module._forward_pre_hooks`` / ``_forward_hooks``: PyTorch has public API to add and remove hooks, not to
  suspend FSDP's own for a while.
"""

from __future__ import annotations

from contextlib import contextmanager


def _fsdp_param_groups(module) -> list:
    """The parameter groups of one FSDP2 module (torch <= 2.11 keeps one, later versions a list)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _is_fsdp_hook(hook) -> bool:
    """A forward (pre-)hook that FSDP2's ``fully_shard`` registered (bound method or closure of its state module)."""
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")


class _HookStrip:
    """Take FSDP2's forward hooks off one module and put them back where they were (order kept)."""

    def __init__(self, module):
        self.saved = [(d, list(d.items())) for d in (module._forward_pre_hooks, module._forward_hooks)]
        for hooks, items in self.saved:
            for key, hook in items:
                if _is_fsdp_hook(hook):
                    del hooks[key]

    def restore(self):
        for hooks, items in self.saved:
            now = dict(hooks)
            hooks.clear()
            for key, hook in items:  # FSDP's own, and the others that are still registered, in their old order
                if _is_fsdp_hook(hook) or key in now:
                    hooks[key] = hook
            for key, hook in now.items():  # registered during the block
                hooks.setdefault(key, hook)


@contextmanager
def gathered_weights(model, skip_hooks: bool = True):
    """All-gather FSDP2-sharded parameters at the start of the block (generation) and keep them so until its end,
    then shard them again.

    FSDP2 all-gathers a layer before each forward and frees it after; HF ``generate`` runs one forward per token, so a
    completion of C tokens costs C all-gathers of every layer (TRL 1.15 does nothing about it for FSDP2). Setting
    ``reshard_after_forward`` off for the duration (the use PyTorch documents for evaluation) gathers each layer once.

    With ``skip_hooks``, each FSDP module also drops FSDP's forward hooks once its first forward inside the block has
    gathered it: the hooks then only re-check state and cast inputs that already have the compute dtype, Python
    work at every module of every decoding step. Modules that have not run keep their hooks; all are put back (in
    their order) before the weights are sharded again. A no-op for a model without FSDP2 modules.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if modules:
        # FSDP2 takes the first module to run forward as its root; generation enters below the root (PEFT's and
        # transformers' generate call the inner model), so the outermost module is initialised as root here.
        modules[0]._get_fsdp_state()._lazy_init()
    before = [all(g.post_forward_mesh_info is not None for g in _fsdp_param_groups(m)) for m in modules]
    strips, triggers = [], {}

    def strip_after_first_forward(module, _args, _output):
        if all(g.is_unsharded for g in _fsdp_param_groups(module)):
            strips.append(_HookStrip(module))
            triggers.pop(module).remove()  # and this hook: with none left, the module takes nn.Module's fast path

    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        # Gathered now, not at each module's first forward: the decoding engine folds LoRA into generation copies
        # of the weights before its first forward, and needs whole weights to do it.
        module.unshard()
        if skip_hooks:  # appended: runs after FSDP's own post-forward hook
            triggers[module] = module.register_forward_hook(strip_after_first_forward)
    try:
        yield
    finally:
        for handle in triggers.values():
            handle.remove()
        for strip in reversed(strips):
            strip.restore()
        for module, reshard in zip(modules, before):
            module.set_reshard_after_forward(reshard, recurse=False)
            if reshard:
                module.reshard()
