"""``ULDTrainer`` in a real ``transformers.Trainer`` loop: gradient accumulation gives the
update of one large batch, for each reduction that trains, and that update is the gradient of
``uld_distillation_loss`` on the whole batch.

Tiny Llama models (student vocabulary 48, teacher 40), four samples of fixed length, plain SGD
with one step: the student's parameters after the step are ``w - lr * grad``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra; CI installs it with [test]")

from uld_kernels import ULDLoss, uld_distillation_loss  # noqa: E402
from uld_kernels.trainer import ULDTrainer  # noqa: E402
from reference.tolerances import MODEL_GRAD_TOL  # noqa: E402

IGNORE = -100
SAMPLES, STUDENT_LEN, TEACHER_LEN = 4, 10, 12
LR = 0.5


def _model(vocab: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).float()


def _samples(seed: int) -> list[dict[str, torch.Tensor]]:
    """Each sample: a prompt of 2-4 tokens, then an answer of 3-7 tokens, then padding, in
    both tokenizations (the teacher's prompt and answer lengths differ from the student's)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SAMPLES):
        sample = {}
        for prefix, length, vocab in (("", STUDENT_LEN, 48), ("teacher_", TEACHER_LEN, 40)):
            ids = torch.randint(0, vocab, (length,), generator=g)
            prompt = int(torch.randint(2, 5, (1,), generator=g))
            answer = int(torch.randint(3, 8, (1,), generator=g))
            labels = torch.full((length,), IGNORE)
            labels[prompt:prompt + answer] = ids[prompt:prompt + answer]
            mask = torch.zeros(length, dtype=torch.long)
            mask[:prompt + answer] = 1
            sample.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels})
        out.append(sample)
    return out


def _uld(reduction: str) -> ULDLoss:
    return ULDLoss(reduction=reduction, distillation_weight=1.5, skip_student_eos=True)


def _train_one_step(tmp_path, reduction: str, batch: int, accumulation: int, **more_args):
    """The student's update (parameters before minus after, over the learning rate) after one
    SGD step of ULDTrainer with ``batch`` samples a device and ``accumulation`` steps."""
    student, teacher = _model(48, seed=1), _model(40, seed=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{reduction}-{batch}x{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, remove_unused_columns=False,
        report_to="none", save_strategy="no", logging_strategy="no", seed=0, dataloader_drop_last=False,
        **more_args)
    trainer = ULDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_samples(3),
                         uld_loss=_uld(reduction))
    before = {k: v.detach().cpu().clone() for k, v in student.named_parameters()}
    trainer.train()
    return {k: (before[k] - v.detach().cpu()) / LR for k, v in student.named_parameters()}


def gradient_by_hand(reduction: str, device) -> dict[str, torch.Tensor]:
    """The gradient of ``uld_distillation_loss`` on all the samples at once, with the
    Trainer's token count, for the initial student; returned on the CPU."""
    fresh, teacher = _model(48, seed=1).to(device), _model(40, seed=2).to(device)
    samples = _samples(3)
    batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                 attention_mask=batch["teacher_attention_mask"]).logits
    count = int((batch["labels"][:, 1:] != IGNORE).sum())
    total = uld_distillation_loss(logits, teacher_logits, batch["labels"], batch["teacher_labels"],
                                  num_items_in_batch=count, **_uld(reduction).options)[0]
    total.backward()
    return {k: v.grad.cpu() for k, v in fresh.named_parameters()}


def assert_updates_equal(got: dict, want: dict, what: str):
    for name in want:
        torch.testing.assert_close(got[name], want[name], **MODEL_GRAD_TOL,
                                   msg=lambda m: f"{what}: {name}: {m}")


TRAINER_REDUCTIONS = ["paper", "token_mean", "sum"]


@pytest.mark.parametrize("reduction", TRAINER_REDUCTIONS)
def test_accumulated_update_is_the_whole_batch_gradient(tmp_path, reduction):
    """Two micro-batches of two accumulate to the update of one batch of four, and that update
    is the gradient of the loss on the four samples (with the Trainer's token count for
    "token_mean"): the ULD term of "paper" is not counted twice, nor divided twice."""
    accumulated = _train_one_step(tmp_path, reduction, batch=2, accumulation=2)
    whole = _train_one_step(tmp_path, reduction, batch=4, accumulation=1)
    assert_updates_equal(accumulated, whole, f"{reduction}, 2 x 2 accumulated against 4 at once")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer's device
    assert_updates_equal(whole, gradient_by_hand(reduction, device),
                         f"{reduction}, the Trainer's step against the gradient of the loss")


def _trainer(tmp_path, accumulation: int, reduction: str = "paper") -> ULDTrainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"eval-{accumulation}"), per_device_eval_batch_size=SAMPLES,
        gradient_accumulation_steps=accumulation, remove_unused_columns=False, report_to="none")
    return ULDTrainer(model=_model(48, seed=1), teacher_model=_model(40, seed=2), args=args,
                      uld_loss=ULDLoss(reduction=reduction, distillation_weight=1.5))


def test_evaluation_loss_does_not_depend_on_accumulation(tmp_path):
    """Evaluation passes a count of its one batch too: the "paper" ULD term must not be divided
    by the training's accumulation steps there (it was, before this test)."""
    losses = [_trainer(tmp_path, steps).evaluate(eval_dataset=_samples(5))["eval_loss"] for steps in (1, 4)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6), f"eval_loss with 1 and 4 accumulation steps: {losses}"


def test_data_parallel_takes_the_whole_count(tmp_path):
    """Under DataParallel (one process, n_gpu > 1) the Trainer hands the count as [n_gpu, 1],
    divided by n_gpu unless averaged across devices; the loss reads the gathered batch, so it
    needs the whole count and no factor. The arithmetic alone (no second GPU here)."""
    trainer = _trainer(tmp_path, 1)
    trainer.args._n_gpu = 2
    for average, per_replica, whole in ((True, 12, 12), (False, 6, 12)):
        trainer.args.average_tokens_across_devices = average
        count, scale = trainer._count_and_scale(torch.full((2, 1), per_replica))
        assert (int(count), scale) == (whole, 1), f"average_tokens_across_devices={average}: {int(count)}, {scale}"
    trainer.args._n_gpu = 1
    trainer.args.average_tokens_across_devices = True
    assert trainer._count_and_scale(torch.tensor(12))[1] == trainer.accelerator.num_processes


def test_refuses_arguments_that_would_lose_the_teacher(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")  # drops columns
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        ULDTrainer(model=_model(48, 1), teacher_model=_model(40, 2), args=args, train_dataset=_samples(3))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False)
    with pytest.raises(ValueError, match="reduction"):
        ULDTrainer(model=_model(48, 1), teacher_model=_model(40, 2), args=args, train_dataset=_samples(3),
                   uld_loss=ULDLoss(reduction="none"))
