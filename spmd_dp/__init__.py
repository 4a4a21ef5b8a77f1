"""spmd_dp: vLLM offline batch inference on one GPU or a thousand, as one SPMD program under torchrun."""

__version__ = "0.1.0"
