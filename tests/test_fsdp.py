"""FSDP2 generation: the weights are all-gathered once per generation, not once per decoding step.

Runs in a child process with a one-process gloo group on CPU (FSDP2's ``fully_shard`` works there), so the test
process keeps no process group.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, os, sys
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from transformers import LlamaConfig, LlamaForCausalLM
from sdgrpo.trainer import gathered_weights

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=2))
for layer in model.model.layers:
    fully_shard(layer, reshard_after_forward=True)
fully_shard(model, reshard_after_forward=True)
gathers = []
unshard = FSDPParamGroup.unshard
def counting_unshard(self, *args, **kwargs):
    if not self.is_unsharded and self._all_gather_result is None:
        gathers.append(1)
    return unshard(self, *args, **kwargs)
FSDPParamGroup.unshard = counting_unshard
prompt = torch.tensor([[3, 4, 5]])
kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
with torch.no_grad():
    plain = model.generate(prompt, **kw)
plain_gathers = len(gathers)
gathers.clear()
with torch.no_grad(), gathered_weights(model):
    held = model.generate(prompt, **kw)
modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
print(json.dumps({
    "plain_gathers": plain_gathers, "held_gathers": len(gathers), "same": torch.equal(plain, held),
    "sharded_after": [not g.is_unsharded for m in modules for g in m._get_fsdp_state()._fsdp_param_groups],
    "reshard_after": [g._reshard_after_forward for m in modules for g in m._get_fsdp_state()._fsdp_param_groups],
}))
dist.destroy_process_group()
"""


def test_fsdp2_weights_are_gathered_once_per_generation(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", CHILD, str(port)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # 4 shard groups (3 layers + the root's embeddings/norm/head), 10 forwards (prompt + 9 decoding steps).
    assert got["plain_gathers"] == 4 * 10
    assert got["held_gathers"] == 4
    assert got["same"]  # the same greedy tokens
    assert got["sharded_after"] == [True] * 4 and got["reshard_after"] == [True] * 4  # as before the block
