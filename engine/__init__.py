"""DBD backdoor-defense training engine: FFCV data, on-the-fly attacks, DDP/DeepSpeed stages."""

__version__ = "0.1.0"
