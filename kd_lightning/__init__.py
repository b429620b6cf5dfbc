"""kd_lightning: knowledge distillation of large language models with PyTorch Lightning.

``from kd_lightning import losses`` imports pure torch only; the Lightning parts load
on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "DistillationModule": "kd_lightning.module",
    "TokenBatch": "kd_lightning.tokens",
    "InstructionDataModule": "kd_lightning.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kd_lightning' has no attribute {name!r}")


__all__ = ["DistillationModule", "InstructionDataModule", "TokenBatch", "losses"]
