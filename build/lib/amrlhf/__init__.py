"""amrlhf: adaptive message-wise RLHF experiments on PyTorch Lightning."""

__version__ = "0.1.0"
