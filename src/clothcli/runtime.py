"""Where and how a model runs: the device, the precision, the Accelerator, and the batched inference
loop that training's validation and `evaluate` share.

Every command that picks a device goes through `resolve_device`, so "cuda if available, else cpu"
and the error for a missing GPU are decided in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from torch import nn

from clothcli.errors import UserError
from clothcli.io_utils import user_cache_dir


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` (cpu, cuda, cuda:N), or the GPU when there is one; UserError for a missing GPU."""
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{requested}' (use cpu, cuda or cuda:N)")
    return device


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_description() -> str:
    """This CPU in the terms its speed depends on: model name, cores, and the vector instructions
    (a speed measured on one host kind is not reused on another)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")
    return f"{_cpu_name()} x{os.cpu_count()} " + ",".join(f for f in wanted if f in flags)


def resolve_precision(requested: str, device_type: str) -> str:
    """'auto' means bf16 where the hardware does it natively, else full precision."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def make_accelerator(
    mixed_precision: str,
    grad_accum: int = 1,
    device: torch.device | None = None,
    compile_backend: str | None = None,
    log_with: list[str] | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """An Accelerator on `device` (default: `resolve_device()`); a single-process caller may build
    several (tests, tune then train).

    With `compile_backend`, `prepare` wraps the model in torch.compile (Accelerate's dynamo plugin);
    `log_with` names Accelerate trackers, whose files go under `project_dir` until
    `training.tracking.start_tracking` points them at the run folder."""
    device = device or resolve_device()
    if compile_backend:
        keep_compiled_kernels()
    if AcceleratorState._shared_state and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=resolve_precision(mixed_precision, device.type),
        gradient_accumulation_steps=grad_accum,
        cpu=device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=device.type == "cuda"),
        step_scheduler_with_optimizer=False,
        dynamo_backend=compile_backend or "no",
        log_with=log_with or None,
        project_dir=project_dir,
    )


def keep_compiled_kernels() -> None:
    """Point torch's inductor cache at the user's cache unless the user chose a folder: torch keeps
    compiled graphs and kernels in a temporary folder (gone at a reboot); kept, a second run of the same
    model, size and batch reuses them instead of compiling again. Importing timm already writes torch's
    temporary default into the environment, so that value counts as not chosen; inductor reads the
    variable again each time it looks for a cached graph, so this holds when called before compiling."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None:
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        except ImportError:  # another torch layout: leave whatever is set alone
            return
        if os.path.abspath(current) != os.path.abspath(default_cache_dir()):
            return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir() / "inductor")


def check_compile_backend(name: str | None) -> None:
    """UserError unless torch.compile knows backend `name` (checked before any work is done)."""
    if name is None:
        return
    keep_compiled_kernels()
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        usual = ", ".join(torch._dynamo.list_backends())  # without the debug and testing ones
        raise UserError(f"train.compile: unknown torch.compile backend '{name}' (e.g. {usual}; eager for debugging)")


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(accelerator: Accelerator) -> str:
    """Where a run trains, in words: the device, its name, threads or processes (recorded in checkpoints)."""
    device = accelerator.device
    if device.type == "cuda":
        what = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        what = f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"
    processes = accelerator.num_processes
    return what + (f" × {processes} processes" if processes > 1 else "") + f", torch {torch.__version__}"


def plain_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without Accelerate's or torch.compile's wrappers: what EMA, SWA and checkpoints use."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def predict_batches(
    model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Logits, targets and dataset indices over `loader`, gathered from all processes.

    gather_for_metrics drops the samples accelerate duplicated to even out the last batch.
    """
    model.eval()
    outputs, targets, indices, errors = [], [], [], []
    with torch.inference_mode():
        for images, target, index, errs in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                logits = model(images)
            logits, target, index = accelerator.gather_for_metrics((logits.float(), target, index))
            outputs.append(logits.cpu())
            targets.append(target.cpu())
            indices.append(index.cpu())
            errors.extend((int(i), e) for i, e in zip(index.tolist(), errs) if e)
    if not outputs:
        empty = torch.empty(0)
        return empty, empty.long(), empty.long(), errors
    return torch.cat(outputs), torch.cat(targets), torch.cat(indices), errors
