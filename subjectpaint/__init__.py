"""subjectpaint: personalized product placement with exemplar-inpainting diffusion."""

from .base import ExemplarInpainter
from .masks import PasteBack
from .result import Placement
from .sampler import LatentStart, Sampler
from .studio import Studio
from .subject import Subject

__version__ = "0.1.0"
__all__ = ["ExemplarInpainter", "LatentStart", "PasteBack", "Placement", "Sampler", "Studio", "Subject", "__version__"]
