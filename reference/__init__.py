"""Pure PyTorch reference of the ULD loss: the oracle for every test and the baseline of every benchmark."""

from reference.uld import uld_loss_reference, uld_row_losses_reference
from reference.paper import uld_distillation_loss_reference

__all__ = ["uld_loss_reference", "uld_row_losses_reference", "uld_distillation_loss_reference"]
