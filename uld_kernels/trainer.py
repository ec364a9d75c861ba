"""``ULDTrainer``: a Hugging Face ``Trainer`` whose loss is the paper's ULD loss against a frozen
teacher that reads the same samples through its own tokenizer.

Needs ``transformers`` (``pip install "uld_kernels[hf]"``); ``import uld_kernels`` does not
import this module.

What it handles that a ``compute_loss`` written from the README would have to:

- **Gradient accumulation.** When the Trainer passes ``num_items_in_batch`` (the count of the
  student's target tokens over all accumulated micro-batches, and over all processes with
  ``average_tokens_across_devices``), it does not divide the loss by the accumulation steps
  itself. ``reduction="token_mean"`` divides both terms by that count; with
  ``reduction="paper"`` the cross-entropy is divided by it and the ULD term, a per-sample
  mean, by the accumulation steps here. Either way the accumulated gradient is that of the
  whole batch.
- **Several processes.** With ``average_tokens_across_devices`` the count is summed over
  processes while DDP averages the gradients: the loss is multiplied by the number of
  processes, as the Trainer's own ``compute_loss`` does.
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
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
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
        scale = 1
        if num_items_in_batch is not None:
            if getattr(self.args, "average_tokens_across_devices", False):
                scale = self.accelerator.num_processes
            if options["reduction"] == "paper":
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                options["distillation_weight"] /= steps * scale
        total, ce, distillation = uld_distillation_loss(
            student.logits, teacher.logits, inputs["labels"], inputs["teacher_labels"],
            num_items_in_batch=num_items_in_batch, **options)
        self.last_losses = {"ce": ce.detach(), "distillation": distillation.detach()}  # read: no sync here
        total = total * scale
        return (total, student) if return_outputs else total
