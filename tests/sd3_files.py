"""The tests' SD3 set (controlrt.smallsets, scale 1)."""

from controlrt.smallsets import SD3_NAMES as NAMES
from controlrt.smallsets import SD3_ZEROS as ZEROS
from controlrt.smallsets import SIZE, build_sd3, t5_tokenizer, write_sd3

__all__ = ["NAMES", "SIZE", "ZEROS", "build_sd3", "t5_tokenizer", "write_sd3"]
