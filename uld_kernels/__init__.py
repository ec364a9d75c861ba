"""uld_kernels: the exact Universal Logit Distillation loss, fused in Triton.

``uld_loss(student_logits, teacher_logits)`` over aligned rows; ``ULDFunction`` is the
autograd Function behind it (custom ops ``uld_kernels::uld_loss`` and
``uld_kernels::scale_rows_``, traceable by ``torch.compile(fullgraph=True)``).
``uld_distillation_loss`` / ``ULDLoss``: the paper's training loss on [B, L, V] batches with
labels (answer spans, alignment, the student's cross-entropy fused in, reductions).
``uld_loss_teacher_topk(student_logits, teacher_logprobs)``: against an offline teacher's
top-K log-probabilities.
"""

from uld_kernels.api import uld_loss, uld_loss_teacher_topk
from uld_kernels.autograd import ULDFunction
from uld_kernels.distill import ULDLoss, uld_distillation_loss

__all__ = ["uld_loss", "uld_loss_teacher_topk", "ULDFunction", "uld_distillation_loss", "ULDLoss"]
__version__ = "0.1.0"
