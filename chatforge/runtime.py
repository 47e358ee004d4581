"""Where training runs: device and precision choice, torch.distributed setup, peak FLOP/s for MFU, peak memory."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chatforge.errors import UserError
from chatforge.linear import linear


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) job started by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); gloo on CPU, NCCL on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(value, d: Dist) -> list:
    """`value` from every process, in rank order (pickled: for small, ragged things such as a rollout)."""
    if not d.enabled:
        return [value]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_parameters(params: list[torch.Tensor], d: Dist) -> None:
    """Rank 0's values of `params` on every process (as DDP does when it wraps a model)."""
    if d.enabled:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def sum_gradients(params: list[torch.Tensor], scalars: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum the gradients of `params` and the 1-D tensor `scalars` over processes, in one collective, and
    return the summed scalars. A parameter without a gradient on this process counts as zeros, so every
    process calls this the same number of times, whatever work it had.

    By hand rather than DDP because PPO's minibatch update runs the policy twice (answers, then pretraining
    text) before one backward pass, weighs each process's share by its token count (a sum, not DDP's mean),
    and must agree on whether the update is applied (the summed loss rides along in `scalars`)."""
    if not d.enabled:
        return scalars
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in params]
    flat = torch.cat([*parts, scalars.to(parts[0].dtype if parts else scalars.dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        summed = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)
        offset += p.numel()
    return flat[offset:].to(scalars.dtype)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a valid torch device (try auto, cpu, cuda, cuda:0, mps)") from None
    if device.type == "cuda" and device.index is None:  # under torchrun each process takes its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this torch has no CUDA GPU")
        torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast precision: 'auto' is bf16 on a GPU that supports it and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    # float16 would need a gradient scaler against underflow; bf16 has fp32's range and needs none
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense (no sparsity) tensor-core peaks in FLOP/s, from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    ("H100", torch.bfloat16): 989e12, ("H200", torch.bfloat16): 989e12, ("A100", torch.bfloat16): 312e12,
    ("L4", torch.bfloat16): 121e12, ("A10", torch.bfloat16): 125e12, ("4090", torch.bfloat16): 165e12,
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                         repeats: int = 10, seconds: float = 1.0) -> float:
    """Median FLOP/s of a square product on the kernels the model's layers use (`chatforge.linear`): the
    practical peak that MFU is measured against on a CPU."""
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a resumed run must not see this
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    rates, deadline = [], time.perf_counter() + seconds
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first calls warm up caches and thread pools
            rates.append(2 * size**3 / (time.perf_counter() - t0))
        if i >= 4 and time.perf_counter() > deadline:
            break
    return statistics.median(rates)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device: the data-sheet figure for known GPUs, measured matmul speed otherwise."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (model, table_dtype), flops in GPU_PEAK_FLOPS.items():
            if model in name and table_dtype == dtype:
                return flops
    return measure_matmul_flops(device, dtype)


def peak_memory(fn, device: torch.device):
    """(fn(), the most bytes of tensor memory that fn held at once beyond what was allocated before it).
    On CUDA the allocator's own peak counter; on the CPU, which keeps none, the allocations and frees that
    PyTorch's profiler records, summed in time order (the profiler slows fn: measure, don't time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, size in events:
        held += size
        peak = max(peak, held)
    return result, peak


def peak_resident_memory(fn) -> tuple[object, int | None]:
    """(fn(), the most bytes of memory the process had resident while fn ran: model weights, optimizer state,
    activations and everything else; GPU memory is not counted). Linux only (None elsewhere): writing 5 to
    /proc/self/clear_refs resets the peak that /proc/self/status reports as VmHWM."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return fn(), None
    result = fn()
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return result, kib * 1024


def listen(host: str, port: int) -> socket.socket:
    """Bind before starting the server, so that a taken port is a one-line error."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
