"""One SGD step of ULDTrainer in each process of a DDP run (started by torchrun from
``tests/test_trainer_processes.py``); rank 0 saves the student's updates.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.trainer_ddp_worker OUT_DIR

On GPUs (one a process, NCCL) where there are as many as processes; on the CPU (gloo)
otherwise, where the loss runs through the float64 reference: the Trainer's scaling for the
processes is what is checked, not the kernels.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch
import torch.distributed as dist

from tests.test_trainer import TRAINER_REDUCTIONS, _train_one_step

# (per-device batch, accumulation steps): each makes the four samples one global batch
# over two processes.
SHAPES = ((2, 1), (1, 2))


def main(out_dir: pathlib.Path) -> None:
    world = int(os.environ["WORLD_SIZE"])
    on_gpus = torch.cuda.device_count() >= world
    more = dict(average_tokens_across_devices=True)
    if not on_gpus:
        more.update(use_cpu=True, ddp_backend="gloo")
    updates = {}
    for reduction in TRAINER_REDUCTIONS:
        for batch, accumulation in SHAPES:
            updates[reduction, batch, accumulation] = _train_one_step(
                out_dir, reduction, batch=batch, accumulation=accumulation, **more)
    if int(os.environ["RANK"]) == 0:
        torch.save({"updates": updates, "world": world, "on_gpus": on_gpus}, out_dir / "updates.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
