"""FSDP2 generation: the weights are all-gathered once per generation, not once per decoding step, and the
decoding steps run without FSDP's per-module hooks.

Runs in a child process with a one-process gloo group on CPU (FSDP2's ``fully_shard`` works there), so the test
process keeps no process group.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import functools, json, os, sys
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from transformers import LlamaConfig, LlamaForCausalLM
from sdgrpo.fsdp import _fsdp_param_groups, gathered_weights

calls = {"gathers": 0, "pre_forward": 0}
unshard = FSDPParamGroup.unshard
def counting_unshard(self, *args, **kwargs):
    if not self.is_unsharded and self._all_gather_result is None:
        calls["gathers"] += 1
    return unshard(self, *args, **kwargs)
FSDPParamGroup.unshard = counting_unshard
pre_forward = FSDPState._pre_forward
@functools.wraps(pre_forward)  # keeps __module__: still one of FSDP's hooks
def counting_pre_forward(self, *args, **kwargs):
    calls["pre_forward"] += 1
    return pre_forward(self, *args, **kwargs)
FSDPState._pre_forward = counting_pre_forward

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=2, tie_word_embeddings=False))
# As accelerate shards a model: each layer, the embeddings, [final norm, head] as one group, then the root; with
# "bf16", accelerate's mixed precision (fp32 shards, bf16 compute: FSDP's hooks cast the inputs).
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if sys.argv[2] == "bf16" else None
kw_mp = {"mp_policy": mp} if mp else {}
for layer in model.model.layers:
    fully_shard(layer, reshard_after_forward=True, **kw_mp)
fully_shard(model.model.embed_tokens, reshard_after_forward=True, **kw_mp)
fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False, **kw_mp)
fully_shard(model, reshard_after_forward=True, **kw_mp)
hooks = lambda: [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]
prompt = torch.tensor([[3, 4, 5]])
kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
def run(context):
    calls.update(gathers=0, pre_forward=0)
    with torch.no_grad(), context:
        out = model.generate(prompt, **kw)
    return (out.sequences, torch.stack(out.scores)), dict(calls)
import contextlib
hooks_before = hooks()
plain, plain_calls = run(contextlib.nullcontext())
held, held_calls = run(gathered_weights(model, skip_hooks=False))
sharded_after_held = [not g.is_unsharded for m in modules for g in _fsdp_param_groups(m)]
skipped, skipped_calls = run(gathered_weights(model))
hooks_after = hooks()
again, again_calls = run(contextlib.nullcontext())
print(json.dumps({
    "plain": plain_calls, "held": held_calls, "skipped": skipped_calls, "again": again_calls,
    "same": [torch.equal(plain[0], t[0]) and torch.equal(plain[1], t[1]) for t in (held, skipped, again)],
    "score_dtype": str(plain[1].dtype),
    "hooks_restored": hooks_after == hooks_before,
    "sharded_after": [sharded_after_held,
                      [not g.is_unsharded for m in modules for g in _fsdp_param_groups(m)]],
    "reshard_after": [g._reshard_after_forward for m in modules for g in _fsdp_param_groups(m)],
}))
dist.destroy_process_group()
# Leave without the interpreter's teardown: a gloo thread still joinable there aborts the process now and then
# ("terminate called without an active exception", exit -6) after every result was printed.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp2_weights_are_gathered_once_per_generation(tmp_path, precision):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", CHILD, str(port), precision], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # 5 shard groups (3 layers, the embeddings, [norm, head]; the root holds none), 10 forwards (prompt + 9 steps).
    # Plain FSDP2 gathers again at each forward except [norm, head] (not resharded after forward).
    # FSDP's pre-forward runs 7 times a forward: the root, the embeddings, 3 layers, norm and head (a group's hook
    # fires for each of its modules).
    assert got["plain"] == {"gathers": 4 * 10 + 1, "pre_forward": 7 * 10}
    # Weights held: one gather for each resharded group ([norm, head] is still gathered), hooks still run...
    assert got["held"] == {"gathers": 4, "pre_forward": 7 * 10}
    assert got["skipped"] == {"gathers": 4, "pre_forward": 7}  # ... or only in the first forward
    assert got["again"] == {"gathers": 4 * 10, "pre_forward": 7 * 10}  # the hooks are back and do their work
    assert got["same"] == [True, True, True]  # the same greedy tokens and the same logits, bit for bit, every way
    assert got["hooks_restored"]  # same hooks, same order
    # Sharded again after each block, resharding as configured before it ([norm, head] keeps False).
    # Per FSDP module: 3 layers, the embeddings, then norm and head (one group, listed for each).
    assert got["sharded_after"] == [[True] * 4 + [False] * 2] * 2
    assert got["reshard_after"] == [True] * 4 + [False] * 2


ENGINE_CHILD = r"""
import json, os, sys
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK=sys.argv[2], WORLD_SIZE="2")
dist.init_process_group("gloo")
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from sdgrpo.engine import DecodeEngine, Sampling
from sdgrpo.fsdp import _fsdp_param_groups, gathered_weights

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                    bos_token_id=2, tie_word_embeddings=False))
# init_lora_weights=False: B is not zero, so the adapters change what is decoded and folding them matters
model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
prompts = torch.tensor([[0, 0, 3, 4, 5], [2, 7, 8, 9, 10], [0, 11, 12, 13, 14]])
mask = (prompts != 0).long()
greedy = Sampling(max_new_tokens=12, do_sample=False, eos_token_ids=(1,), pad_token_id=0)
sampled = Sampling(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, eos_token_ids=(1,), pad_token_id=0)

def run(engine, s, seed=7):
    torch.manual_seed(seed)
    return engine.decode(model, prompts, mask, s)

plain = DecodeEngine(compile=False)
expected = [run(plain, greedy), run(plain, sampled)]
weights = {name: p.detach().clone() for name, p in model.named_parameters()}
inner = model.base_model.model
for layer in inner.model.layers:  # as accelerate shards it: each layer, the embeddings, [norm, head], the root
    fully_shard(layer)
fully_shard(inner.model.embed_tokens)
fully_shard([inner.model.norm, inner.lm_head], reshard_after_forward=False)
fully_shard(model)
modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
engine = DecodeEngine(compile=False)
got = []
for s in (greedy, sampled, greedy):  # the first call is the model's first forward, as in a training run
    with gathered_weights(model):
        got.append(run(engine, s))
same = [torch.equal(g.sequences, e.sequences) and torch.allclose(g.logprobs, e.logprobs, atol=1e-6)
        for g, e in zip(got, expected + expected[:1])]
full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # [norm, head] stays gathered
untouched = all(torch.equal(full(p), weights[name]) for name, p in model.named_parameters())
print(json.dumps({"same": same, "folded": len(engine.fold.copies), "untouched": untouched,
                  "sharded": [not g.is_unsharded for m in modules for g in _fsdp_param_groups(m)],
                  "completion": got[0].sequences[:, prompts.size(1):].tolist()}))
dist.destroy_process_group()
# Leave without the interpreter's teardown: a gloo thread still joinable there aborts the process now and then
# ("terminate called without an active exception", exit -6) after every result was printed.
sys.stdout.flush()
os._exit(0)
"""


def test_engine_decodes_under_fsdp2_as_without_it(tmp_path):
    """Two processes (gloo, CPU), a LoRA model sharded as accelerate shards it: the decoding engine inside
    ``gathered_weights`` folds the adapters into copies of the gathered weights and decodes exactly the tokens and
    log-probs it decodes for the unsharded model (greedy, and seeded top-k sampling), from the very first forward
    on; the trained weights are untouched and sharded again after each call."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", ENGINE_CHILD, str(port), str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got[0] == got[1]  # both ranks decode the same
    assert got[0]["same"] == [True, True, True]
    assert got[0]["folded"] == 2 * 7  # every LoRA-wrapped Linear of the 2 layers (q k v o gate up down)
    assert got[0]["untouched"]
    # sharded again: the 2 layers and the embeddings; [norm, head] stays gathered, as configured
    assert got[0]["sharded"] == [True, True, True, False, False]
