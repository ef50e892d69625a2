"""critsample: find the critical window of diffusion transformers and sample or fine-tune with it."""

from .denoisers import NULL, Denoiser, PromptCond
from .errors import UserError
from .models import load
from .noise import Schedule, convert
from .sampling import Plan, Step, sample

__all__ = ["NULL", "Denoiser", "Plan", "PromptCond", "Schedule", "Step", "UserError", "convert", "load", "sample"]
__version__ = "0.1.0"
