"""storydiffusion: consistent characters across story panels, on diffusers."""

from .attention import ConsistentSelfAttnProcessor, CSAConfig, CSASchedule
from .bank import BankSettings, IdentityBank
from .controller import ConsistentAttention
from .errors import BankMismatchError, StoryDiffusionError

__all__ = [
    "BankMismatchError",
    "BankSettings",
    "CSAConfig",
    "CSASchedule",
    "ConsistentAttention",
    "ConsistentSelfAttnProcessor",
    "IdentityBank",
    "StoryDiffusionError",
]
__version__ = "0.1.0"
