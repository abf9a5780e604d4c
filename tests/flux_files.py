"""The tests' Flux set (controlrt.smallsets, scale 1)."""

from controlrt.smallsets import FLUX_GUIDANCE as GUIDANCE
from controlrt.smallsets import FLUX_HINTS as HINTS
from controlrt.smallsets import FLUX_LAYERS as LAYERS
from controlrt.smallsets import FLUX_MODES as MODES
from controlrt.smallsets import FLUX_NAMES as NAMES
from controlrt.smallsets import SIZE, build_flux, write_flux

__all__ = ["GUIDANCE", "HINTS", "LAYERS", "MODES", "NAMES", "SIZE", "build_flux", "write_flux"]
