"""ULDTrainer over several processes and devices, for real: DDP with two processes (on two
GPUs where there are, else on the CPU with gloo) and DataParallel over two GPUs. Each global
batch of four samples must give the update that is the gradient of the loss on the four at
once (``test_trainer.gradient_by_hand``): the count summed over processes, the loss
multiplied back by their number against DDP's average, the ULD term of "paper" divided by
the accumulation steps once.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra; CI installs it with [test]")

from tests.test_trainer import SAMPLES, TRAINER_REDUCTIONS, _train_one_step, assert_updates_equal, gradient_by_hand  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# NVLink multicast off (the device machines' rule; harmless elsewhere).
NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def test_ddp_two_processes_give_the_whole_batch_gradient(tmp_path):
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.trainer_ddp_worker", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    saved = torch.load(tmp_path / "updates.pt")
    assert saved["world"] == 2
    device = "cuda" if saved["on_gpus"] else "cpu"
    for (reduction, batch, accumulation), update in saved["updates"].items():
        assert_updates_equal(update, gradient_by_hand(reduction, device),
                             f"{reduction}, DDP 2 processes x {batch} samples x {accumulation} steps "
                             f"({'GPUs' if saved['on_gpus'] else 'CPU'}) against the whole batch's gradient")
    assert {r for r, _, _ in saved["updates"]} == set(TRAINER_REDUCTIONS)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() not in (2, 4),
                    reason="needs two or four CUDA GPUs (the device tool's nvidia-h200-x2)")
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("reduction", TRAINER_REDUCTIONS)
def test_data_parallel_gives_the_whole_batch_gradient(tmp_path, reduction, average):
    """One process, several GPUs: the Trainer wraps the student in DataParallel and hands the
    count as [n_gpu, 1] (divided by n_gpu unless averaged across devices)."""
    n_gpu = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none").n_gpu
    assert n_gpu == torch.cuda.device_count(), f"the Trainer sees {n_gpu} GPUs: DataParallel would not run"
    update = _train_one_step(tmp_path, reduction, batch=SAMPLES // n_gpu, accumulation=1,
                             average_tokens_across_devices=average)
    assert_updates_equal(update, gradient_by_hand(reduction, "cuda"),
                         f"{reduction}, DataParallel over {n_gpu} GPUs (average_tokens_across_devices={average})")
