"""inductor-moe: a torch.compile backend that fuses Mixture-of-Experts blocks and block-scaled
FP4 matmuls.  ``torch.compile(model, backend="inductor_moe")``; see README.md."""

from . import config, ops  # noqa: F401  (ops registers the canonical torch.library ops)
from .backend import inductor_moe_backend
from .report import Match, Report, Skip, report
from .spec import GemmSpec, MoESpec

__all__ = ["config", "inductor_moe_backend", "report", "Report", "Match", "Skip", "MoESpec", "GemmSpec"]
