"""Out of memory while training: recognise the allocator's failure and say what to change, from the run's config.

The allocators fail in different words: CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError
"DefaultCPUAllocator: can't allocate memory"; MPS a RuntimeError "MPS backend out of memory"; Python itself
MemoryError. `out_of_memory_error` turns any of them into a TrainingError whose message lists the fixes in the
order to try them (half the micro-batch with twice the accumulation keeps the images per optimizer step; gradient
checkpointing; mixed precision; fewer tiles per backbone call; a smaller input side), names the last checkpoint
(complete, as every published checkpoint is) and gives the command that resumes from it with the first fix.
Batch size, accumulation (keeping their product), gradient checkpointing, mixed precision and tiles per step may
change on resume (vislora.train.rundir); the input size may not.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from vislora.errors import TrainingError
from vislora.run_config import TrainConfig
from vislora.train import checkpoint as ckpt

ALLOCATOR_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "MPS backend out of memory",
                      "CUDA error: out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory failure (CUDA, CPU, MPS) or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in ALLOCATOR_MESSAGES)


def allocator_message(exc: BaseException) -> str:
    """The first line of the allocator's message, from its own words on (the CPU allocator's starts with a C++
    "[enforce fail at alloc_cpu.cpp:NNN] err == 0." that says nothing to a user)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    starts = [text.find(words) for words in ALLOCATOR_MESSAGES if words in text]
    return text[min(starts):].splitlines()[0] if starts else text.splitlines()[0]


def fixes(config: TrainConfig, device: torch.device) -> list[tuple[str, dict[str, object]]]:
    """What to change, first fix first: (advice, the config overrides that apply it on resume, or {} for a new run)."""
    optim, run, data = config.optim, config.run, config.data
    found: list[tuple[str, dict[str, object]]] = []
    if optim.batch_size > 1:
        half = max(d for d in range(1, optim.batch_size // 2 + 1) if optim.batch_size % d == 0)  # exact product
        accum = optim.grad_accum * optim.batch_size // half
        found.append((f"optim.batch_size: {half} with optim.grad_accum: {accum} (the same "
                      f"{optim.batch_size * optim.grad_accum} images per optimizer step, in smaller micro-batches)",
                      {"optim.batch_size": half, "optim.grad_accum": accum}))
    if not run.gradient_checkpointing:
        found.append(("run.gradient_checkpointing: true (activations are recomputed in the backward pass instead of "
                      "kept: less memory, a slower step)", {"run.gradient_checkpointing": True}))
    if run.mixed_precision == "no":
        dtype = "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
        found.append((f"run.mixed_precision: {dtype} (activations in 16 bits)", {"run.mixed_precision": dtype}))
    if data.tiling is not None and data.tiling.tiles_per_step > 1:
        tiles = data.tiling.tiles_per_step // 2
        found.append((f"data.tiling.tiles_per_step: {tiles} (tiles per backbone call; now "
                      f"{data.tiling.tiles_per_step})", {"data.tiling.tiles_per_step": tiles}))
    side = data.tiling.image_size if data.tiling is not None else data.image_size
    if side is not None:
        key = "data.tiling.image_size" if data.tiling is not None else "data.image_size"
        found.append((f"a smaller {key} than {side} (a new run: the input size cannot change on resume)", {}))
    return found


def resume_command(config: TrainConfig, overrides: dict[str, object], num_processes: int) -> str:
    """The shell command that resumes the run from its run directory's config.yaml with `overrides`."""
    saved = Path(config.run.output_dir) / "config.yaml"
    start = "vislora train" if num_processes == 1 else (
        f"accelerate launch --multi_gpu --num_processes {num_processes} -m vislora.cli train")
    sets = "".join(f" --set {shlex.quote(f'{key}={_yaml(value)}')}" for key, value in overrides.items())
    return f"{start} {shlex.quote(str(saved))}{sets}"


def out_of_memory_error(exc: BaseException, config: TrainConfig, device: torch.device, doing: str,
                        num_processes: int = 1) -> TrainingError:
    """The TrainingError for `exc` (an out-of-memory failure while `doing`, e.g. "training step 3")."""
    found = fixes(config, device)
    first = next((overrides for _, overrides in found if overrides), {})
    checkpoints = ckpt.list_checkpoints(Path(config.run.output_dir) / "checkpoints")
    command = resume_command(config, first, num_processes)
    if checkpoints:
        last = checkpoints[-1]
        where = (f"The last checkpoint, {last} (step {ckpt.saved_step(last)}), is complete and was not touched; "
                 f"resume from it with:\n  {command}")
    else:
        due = f"run.save_every is {config.run.save_every}" if config.run.save_every else "run.save_every is 0"
        where = f"No checkpoint was written yet ({due}); this starts the run again:\n  {command}"
    cause = allocator_message(exc)
    settings = (f"optim.batch_size {config.optim.batch_size}, optim.grad_accum {config.optim.grad_accum}, "
                f"run.mixed_precision {config.run.mixed_precision}, run.gradient_checkpointing "
                f"{str(config.run.gradient_checkpointing).lower()}")
    advice = "\n".join(f"  - {text}" for text, _ in found) or "  - free memory on the device (other processes)"
    return TrainingError(f"out of memory on {device.type} in {doing} ({settings}): {cause}\n"
                         f"To fit, change (first fix first):\n{advice}\n{where}")


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
