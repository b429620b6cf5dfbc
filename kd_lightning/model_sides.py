"""Each side of ``model=hf`` (teacher, student) from a directory, a cached hub name or a
GGUF file inside one, with its own tokenizer: what ``cross_tokenizer`` runs read when the
two sides' tokenizers differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from transformers import PreTrainedTokenizerFast

from kd_lightning.models import load_causal_lm, load_student, load_tokenizer, own_tokenizer


def side_tokenizer(name_or_path: str | None, gguf_file: str | None = None) -> PreTrainedTokenizerFast | None:
    """The tokenizer of the model at ``name_or_path``: read from its ``gguf_file`` when one
    is given, else the one shipped beside its weights (``None`` when there is none)."""
    if gguf_file is not None:
        return load_tokenizer(name_or_path, gguf_file=gguf_file)
    return own_tokenizer(name_or_path)


def load_student_side(
    teacher: nn.Module,
    name_or_path: str | None = None,
    layers: Sequence[int] | Mapping | None = None,
    dtype: str = "float32",
    gguf_file: str | None = None,
) -> nn.Module:
    """``models.load_student``, or the student in ``gguf_file`` of ``name_or_path`` (dequantised to ``dtype``)."""
    if gguf_file is not None:
        if layers is not None:  # as load_student refuses a student_path with student_layers
            raise ValueError(
                "give model.student_gguf_file (a whole student) or model.student_layers (teacher layers to copy), not both"
            )
        return load_causal_lm(name_or_path, gguf_file=gguf_file, dtype=dtype)
    return load_student(teacher, name_or_path, layers, dtype)
