"""More than one process: launching through torchrun, and who does what once launched.

`finetune run RECIPE --gpus N [--nodes M --node-rank R --main-address HOST]` validates the recipe, then relaunches
the same command under torchrun (`python -m torch.distributed.run`), one process per GPU. The recipe's
`distributed.strategy` picks DDP (a 4-bit copy of the base per rank, the QLoRA default) or, through accelerate,
FSDP (sharded QLoRA, bnb_4bit_quant_storage in the compute dtype as in Answer.AI's FSDP+QLoRA) or DeepSpeed ZeRO-3.
Without CUDA, `--gpus N` starts N CPU processes over gloo, so the multi-process path is tested anywhere
(`accelerate launch --cpu` would silently start one process).

Once launched, rank 0 alone prepares the data (tokenised once, then read by every rank), writes the manifest,
checkpoint metadata and card, evaluates, merges and publishes; the other ranks take part in training only and wait
for rank 0's verdict on every other stage, so a failure or a preemption on rank 0 ends every rank.

Importing this module must not import torch.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from typing import Any

# Rank 0 can spend hours evaluating and merging while the others wait: the default 30-minute collective timeout
# would kill them.
WAIT = dt.timedelta(hours=12)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init() -> None:
    """Join the process group (gloo on CPU, nccl on GPUs) before the first collective; the Trainer reuses it."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)


def _dist():
    if not active():
        return None
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def share(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank (a collective: every rank must call it)."""
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective)."""
    d = _dist()
    if d is None:
        return flag
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item())


def launch_command(argv: list[str], gpus: int, nodes: int, node_rank: int, main_address: str | None, port: int) -> list[str]:
    """torchrun, re-running `finetune ARGV` (without --gpus) in each of the `gpus` processes of this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
    if not 0 <= node_rank < nodes:  # torchrun would wait forever for a node that cannot exist
        raise ValueError(f"--node-rank {node_rank}: node ranks run from 0 to nodes-1 ({nodes - 1})")
    if nodes > 1:
        if not main_address:
            raise ValueError("--nodes > 1 needs --main-address (the host of node rank 0)")
        cmd += [f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--master_addr={main_address}", f"--master_port={port}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "finetune.cli", *argv]


def launch(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun in its own process group, forwarding SIGTERM/SIGINT to it (it forwards them to every rank)."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
