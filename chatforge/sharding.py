"""Training a model sharded over processes with PyTorch's own FSDP2 and Distributed Checkpoint (`--fsdp`).

Under DDP every process holds the whole model, its gradients and AdamW's two moments: 16 bytes per
parameter in fp32. `fully_shard` (FSDP2) gives each process 1/N of each, and gathers a block's weights
only while that block computes. What the trainer needs besides:

- `shard`: each transformer block a unit of its own (its weights gathered just before it runs, freed after),
  then the root (embeddings, final norm, head);
- `consolidated`: the whole model as one ordinary `GPT` (with its LoRA adapters, if any), for evaluation,
  samples and the checkpoint that `chat`, `serve` and `export` read (an evaluation runs on every process at its own pace, which a sharded
  model, whose every forward pass is a collective, cannot);
- `save_optimizers` / `load_optimizers`: AdamW's state (the trainer's, and a task's own: PPO's value model)
  through torch.distributed.checkpoint, one file per process, keyed by parameter name, so a run resumes on
  any number of processes (or one, unsharded).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from chatforge.errors import UserError
from chatforge.lora import adapter_settings, add_adapters, has_adapters
from chatforge.model import GPT, rotary_tables


def shard(model: GPT, dtype: torch.dtype = torch.float32, average: bool = True) -> None:
    """Shard `model` in place over the default process group: one FSDP unit per block, then the root. With a
    `dtype` below fp32 the gathers move weights in it (half the traffic, and the gathered unit in half the
    memory) while the shards, the optimizer state and the gradients' reduction stay fp32. The gradients
    are averaged over processes, or summed (`average=False`) where each process weighs its own share."""
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for unit in [*model.layers, model]:
        fully_shard(unit, mp_policy=policy)
        if not average:
            if not hasattr(unit, "set_force_sum_reduction_for_comms"):
                raise UserError(f"summed gradients under --fsdp need a newer torch than {torch.__version__} "
                                f"(FSDP2's set_force_sum_reduction_for_comms)")
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a `torch.compile` wrapper holds) is sharded by `shard`."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def consolidated(model: GPT, device: torch.device) -> GPT:
    """The sharded `model`'s weights gathered into an unsharded copy on `device`, on every process (a
    collective: every process calls it)."""
    weights = full_state_dict(model)
    with torch.device("meta"):  # no memory and no initialisation: the gathered tensors become its weights
        copy = GPT(model.config)
        if has_adapters(model):  # the same adapters, so that the gathered names fit
            a = adapter_settings(model)
            copy = add_adapters(copy, a["r"], a["alpha"], a["dropout"], a["targets"], a["base"])
    copy.load_state_dict(weights, assign=True)
    for name, p in model.named_parameters():  # what trains in the sharded model trains in the copy
        copy.get_parameter(name).requires_grad_(p.requires_grad)
    copy.rope_cos, copy.rope_sin = rotary_tables(model.config)  # buffers are not in a state dict
    copy.activation_checkpointing = model.activation_checkpointing
    return copy.to(device).train(model.training)


def save_optimizers(optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], folder: Path) -> None:
    """The state of each named (model, optimizer), one file per process (a collective; on one process, one
    file)."""
    state = {name: get_optimizer_state_dict(model, optimizer) for name, (model, optimizer) in optimizers.items()}
    with _single_process_is_meant():
        dcp.save(state, checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_optimizers(optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], folder: Path) -> None:
    """The states `save_optimizers` wrote, resharded onto this run's processes (a collective)."""
    state = {name: get_optimizer_state_dict(model, optimizer) for name, (model, optimizer) in optimizers.items()}
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    for name, (model, optimizer) in optimizers.items():
        set_optimizer_state_dict(model, optimizer, state[name])


def full_state_dict(model: torch.nn.Module, on_main_only: bool = False) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, gathered on every process (a collective), or only on the main
    process and in CPU memory (`on_main_only`: the others get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_main_only))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors (`full_state_dict`'s, for some of the parameters) into a sharded model: each process
    keeps its shard."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns that it "assumes" one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
