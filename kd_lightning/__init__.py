"""kd_lightning: knowledge distillation of large language models with PyTorch Lightning."""

__version__ = "0.1.0"
