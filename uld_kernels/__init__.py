"""uld_kernels: the exact Universal Logit Distillation loss, fused in Triton.

``uld_loss(student_logits, teacher_logits)`` over aligned rows; ``ULDFunction`` is the
autograd Function behind it (custom ops ``uld_kernels::uld_loss`` and
``uld_kernels::scale_rows_``, traceable by ``torch.compile(fullgraph=True)``).
``uld_distillation_loss`` / ``ULDLoss``: the paper's training loss on [B, L, V] batches with
labels (answer spans, alignment, the student's cross-entropy fused in, reductions).
``uld_loss_teacher_topk(student_logits, teacher_logprobs)``: against an offline teacher's
top-K log-probabilities. ``uld_loss_hybrid(student_logits, teacher_logits, VocabMatch)``:
TRL GOLD's hybrid loss (a divergence on the tokens both vocabularies share, sorted L1 on the
rest; NeMo RL's gold loss by its options), in PyTorch by chunks.
"""

from uld_kernels.api import uld_loss, uld_loss_teacher_topk
from uld_kernels.autograd import ULDFunction
from uld_kernels.distill import ULDLoss, uld_distillation_loss
from uld_kernels.hybrid import HybridULD, VocabMatch, uld_loss_hybrid

__all__ = ["uld_loss", "uld_loss_teacher_topk", "ULDFunction", "uld_distillation_loss", "ULDLoss",
           "uld_loss_hybrid", "VocabMatch", "HybridULD"]
__version__ = "0.1.0"
