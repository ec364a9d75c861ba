"""uld_kernels: the exact Universal Logit Distillation loss, fused in Triton.

``uld_loss(student_logits, teacher_logits)`` over aligned rows; ``ULDFunction`` is the
autograd Function behind it (custom ops ``uld_kernels::uld_loss`` and
``uld_kernels::scale_rows_``, traceable by ``torch.compile(fullgraph=True)``).
"""

from uld_kernels.api import uld_loss
from uld_kernels.autograd import ULDFunction

__all__ = ["uld_loss", "ULDFunction"]
__version__ = "0.1.0"
