"""Distillation data: the shipped Dolly, Self-Instruct and Vicuna sets and the data module."""

from kd_lightning.data.datamodule import (
    FORMATS,
    SHIPPED,
    InstructionDataModule,
    encode_example,
    format_prompt,
    resolve_data_path,
)

__all__ = ["FORMATS", "SHIPPED", "InstructionDataModule", "encode_example", "format_prompt", "resolve_data_path"]
