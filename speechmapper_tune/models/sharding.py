"""Quantization and FSDP2 sharding of a SpeechLM, and the gathers that turn its shards back into whole tensors.

``SpeechLM.quantize_`` and ``SpeechLM.shard`` call these; the stage-2 recipe and bench/stage2_memory.py use them
through the model. Plain PyTorch (``torch.distributed.fsdp.fully_shard``) and torchao, no torchtune: the units
are those torchtune's ``training.shard_model`` would make (each LLM layer, then the root), applied the same way,
bottom-up, then the root.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from speechmapper_tune.models.speech_lm import SpeechLM

QUANTIZE_METHODS = ("nf4",)
NF4_BLOCK, NF4_SCALER_BLOCK = (
    64,
    256,
)  # QLoRA's block sizes (torchao's defaults): 64 weights per scale, 256 scales per scale
NF4_MAX_RANKS = 8  # scale groups sized so that 1, 2, 4 or 8 ranks each hold whole groups of every quantized weight


def quantize_nf4_(llm: nn.Module, world_size: int = 1) -> int:
    """The frozen LLM's layer weights (attention and MLP projections; not the embeddings, head, norms or LoRA
    adapters) as torchao NF4 tensors in place, as torchtune's QLoRA builders keep them; ``F.linear`` on an NF4
    weight dequantizes it to the input's dtype. Returns how many weights were quantized.

    Scales are grouped by 256 (QLoRA's) or, in a matrix too small for that, by fewer, chosen independently of
    the number of ranks, so a run quantizes identically under any ``--nproc_per_node`` that divides them."""
    from torchao.dtypes.nf4tensor import to_nf4

    n = 0
    for name, module in llm.layers.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) and type(module).__name__ != "LoRALinear":
            continue
        if w is None or w.requires_grad or w.dim() != 2:  # LoRA's trainable adapters stay fp32
            continue
        blocks = w.numel() // NF4_BLOCK
        if w.numel() % NF4_BLOCK or blocks % NF4_MAX_RANKS:
            raise ValueError(
                f"llm.quantize=nf4: layers.{name}.weight {tuple(w.shape)} does not split into "
                f"{NF4_MAX_RANKS} x n blocks of {NF4_BLOCK} weights"
            )
        scaler_block = math.gcd(NF4_SCALER_BLOCK, blocks // NF4_MAX_RANKS)
        if w.shape[0] % world_size or (blocks // scaler_block) % world_size:  # FSDP cuts rows and scale groups evenly
            raise ValueError(
                f"llm.quantize=nf4: layers.{name}.weight {tuple(w.shape)} does not shard evenly over {world_size} ranks"
            )
        module.weight = nn.Parameter(to_nf4(w.detach().contiguous(), NF4_BLOCK, scaler_block), requires_grad=False)
        n += 1
    return n


def quantize_(llm: nn.Module, method: str, world_size: int = 1) -> int:
    """``llm.quantize=<method>``: the frozen LLM's layer weights quantized in place; returns how many."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"llm.quantize={method!r}: expected {' or '.join(QUANTIZE_METHODS)} or null")
    return quantize_nf4_(llm, world_size)


def shard_speech_lm(model: "SpeechLM", device: Optional[torch.device] = None) -> None:
    """FSDP2 over a SpeechLM in place (under an initialised process group), torchtune's way: each LLM
    layer a unit, the projector, the token embeddings and an untied LM head units of their own (as
    torchtune's custom_sharded_layers), then the root, whose forward covers ``SpeechLM.forward``'s
    direct calls into the LLM. ``device``: where the collectives run (nccl: the GPU; default: where
    the tensors are)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # torchtune seeds each rank seed+rank: rank 0's fresh projector/LoRA init for all
        for t in [*trainable, *model.projector.buffers()]:
            buf = t.to(device) if device is not None else t  # the model may still be in host memory
            dist.broadcast(buf, src=0)
            if buf is not t:
                t.copy_(buf)
    units = {"projector"}
    if isinstance(model.llm.output, nn.Linear):  # a tied head reads tok_embeddings.weight outside its
        units |= {"llm.tok_embeddings", "llm.output"}  # forward, so a tied table stays in the root unit
    # FSDP for the trainable parts too: their gradients are averaged by the same reduce-scatter and
    # their optimizer state is sharded, with no second (DDP) wrapper around a submodule.
    # Bottom-up (the reverse of named_modules' order) as torchtune's training.shard_model, then the root.
    for name, module in reversed(list(model.named_modules())):
        if name in units or (name.count(".") == 2 and name.startswith("llm.layers.")):
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor shard gathered from every rank (a collective), a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with every tensor whole, on the CPU (collective: every rank calls it)."""
    return {k: full_tensor(v).cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded state tensor gathered whole: the one-process format."""
    sd = optimizer.state_dict()
    state = {
        i: {k: (full_tensor(v).cpu() if isinstance(v, DTensor) else v) for k, v in st.items()}
        for i, st in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of ``full_optimizer_state``: each full state tensor cut into this rank's shard of its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: (
                distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and isinstance(p, DTensor) and v.shape == p.shape
                else v
            )
            for k, v in st.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}
