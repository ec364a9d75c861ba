"""``ULDTrainer``: a Hugging Face ``Trainer`` whose loss is the paper's ULD loss against a frozen
teacher that reads the same samples through its own tokenizer.

Needs ``transformers`` (``pip install "uld_kernels[hf]"``); ``import uld_kernels`` does not
import this module.

What it handles that a ``compute_loss`` written from the README would have to:

- **Gradient accumulation.** When the Trainer passes ``num_items_in_batch`` (the count of the
  student's target tokens over all accumulated micro-batches, and over all processes with
  ``average_tokens_across_devices``), it does not divide the loss by the accumulation steps
  itself. ``reduction="token_mean"`` divides both terms by that count: the accumulated
  gradient is that of the whole batch. With ``reduction="paper"`` the cross-entropy is divided
  by it and the ULD term, a mean over each micro-batch's samples, by the accumulation steps
  here: the whole batch's gradient when the micro-batches hold equal numbers of samples with
  answer rows (a mean of means otherwise, as Hugging Face's losses were before the count).
- **Several processes.** With ``average_tokens_across_devices`` the count is summed over
  processes while DDP averages the gradients: the loss is multiplied by the number of
  processes (over the tensor-parallel size), as the Trainer's own ``compute_loss`` does.
  Under DataParallel (one process, ``n_gpu > 1``) the loss reads the gathered batch: it
  takes the whole count. Context or sequence parallelism splits the sequences, which the
  alignment of answer rows cannot follow.
- The count is taken for any student (``model_accepts_loss_kwargs`` forced on: the loss here
  uses it whether or not the model's ``forward`` would), and the teacher's columns must reach
  ``compute_loss`` (``remove_unused_columns=False``, checked).
"""

from __future__ import annotations

import torch
import transformers

from uld_kernels.distill import ULDLoss, uld_distillation_loss
from uld_kernels.validation import check_choice

TEACHER_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")
TRAINER_REDUCTIONS = ("paper", "token_mean", "sum")


class ULDTrainer(transformers.Trainer):
    """``transformers.Trainer`` with the ULD distillation loss.

    Args:
        teacher_model: the frozen teacher (moved to the Trainer's device, put in eval mode, its
            parameters' ``requires_grad`` turned off).
        uld_loss: the loss options as a ``ULDLoss`` (default ``ULDLoss()``: the paper's
            reduction, weights 1). ``reduction="none"`` (per sample) cannot train and is refused.
        *args, **kwargs: as ``transformers.Trainer``; ``args.remove_unused_columns`` must be
            False.

    Each batch holds the student's ``input_ids``, ``attention_mask``, ``labels`` and the
    teacher's ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``
    (``-100`` on prompt and padding on both sides). The logged loss is the total; the cross-
    entropy and ULD parts of the last batch are in ``self.last_losses``.

    Example::

        args = transformers.TrainingArguments("out", remove_unused_columns=False,
                                              gradient_accumulation_steps=8, bf16=True)
        trainer = ULDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=pairs, data_collator=collate_both_tokenizations,
                             uld_loss=ULDLoss(distillation_weight=1.5, skip_student_eos=True,
                                              student_vocab_size=151665))
        trainer.train()
    """

    def __init__(self, *args, teacher_model: torch.nn.Module, uld_loss: ULDLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("ULDTrainer needs TrainingArguments(remove_unused_columns=False): the Trainer "
                             f"otherwise drops the teacher's columns {', '.join(TEACHER_COLUMNS)}, which the "
                             "student's forward does not take")
        if uld_loss is None:
            uld_loss = ULDLoss()
        if not isinstance(uld_loss, ULDLoss):
            raise TypeError(f"uld_loss must be a uld_kernels.ULDLoss, got {type(uld_loss).__name__}")
        check_choice("uld_loss's reduction", uld_loss.options["reduction"], TRAINER_REDUCTIONS)
        self.uld_loss = uld_loss
        if getattr(teacher_model, "hf_device_map", None) is None and not getattr(teacher_model, "is_quantized", False):
            teacher_model = teacher_model.to(self.args.device)  # placed by the user otherwise (device_map, quantized)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # The Trainer counts the target tokens (num_items_in_batch) only for models it believes
        # take loss kwargs, and divides by the accumulation steps only when it has no count.
        self.model_accepts_loss_kwargs = True
        self.last_losses: dict[str, torch.Tensor] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        missing = [c for c in ("labels", *TEACHER_COLUMNS) if c not in inputs]
        if missing:
            raise KeyError(f"ULDTrainer's batches need the columns {', '.join(missing)} (got "
                           f"{', '.join(inputs)})")
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=inputs["teacher_input_ids"],
                                         attention_mask=inputs["teacher_attention_mask"])
        options = dict(self.uld_loss.options)
        num_items_in_batch, scale = self._count_and_scale(num_items_in_batch)
        if num_items_in_batch is not None and options["reduction"] == "paper":
            # A mean over each micro-batch's samples: the accumulated gradient divides it by
            # the steps (exact when the micro-batches hold equal numbers of samples with
            # answer rows). Evaluation (model.eval()) passes a count of its one batch.
            steps = getattr(self, "current_gradient_accumulation_steps",
                            self.args.gradient_accumulation_steps) if model.training else 1
            options["distillation_weight"] /= steps * scale
        total, ce, distillation = uld_distillation_loss(
            student.logits, teacher.logits, inputs["labels"], inputs["teacher_labels"],
            num_items_in_batch=num_items_in_batch, **options)
        # As they enter the loss (scaled for accumulation and processes); read: no sync here.
        self.last_losses = {"ce": ce.detach(), "distillation": distillation.detach()}
        total = total * scale
        return (total, student) if return_outputs else total

    def _count_and_scale(self, num_items_in_batch):
        """The Trainer's token count as this loss needs it, and the factor on the loss that
        undoes the gradients' average over processes when the count is global."""
        if num_items_in_batch is None:
            return None, 1
        average = getattr(self.args, "average_tokens_across_devices", False)
        if self.args.n_gpu > 1:
            # DataParallel: the count comes as [n_gpu, 1] for losses computed per replica (and
            # divided by n_gpu unless averaged across devices); this loss reads the gathered
            # batch in one process, so it takes the whole count and no factor.
            count = num_items_in_batch.reshape(-1)[0] if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            return (count if average else count * self.args.n_gpu), 1
        if not average:
            return num_items_in_batch, 1
        # The count is summed over processes while DDP averages gradients over them; ranks of a
        # tensor-parallel group share their batch (the Trainer's own factor).
        tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return num_items_in_batch, self.accelerator.num_processes // tp_size
