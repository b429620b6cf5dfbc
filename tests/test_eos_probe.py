"""The study's EOS probe: p(EOS) read where the reference ends, and inside it."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kd_lightning.data.datamodule import encode_example

sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
from eos_probe import eos_probabilities, merged  # noqa: E402


class StopsFrom(nn.Module):
    """A model that gives EOS probability ``p`` at positions from ``start`` on and 0 before."""

    def __init__(self, vocab_size: int, eos: int, start: int, p: float):
        super().__init__()
        self.vocab_size, self.eos, self.start, self.p = vocab_size, eos, start, p

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, self.vocab_size), (1 - self.p) / (self.vocab_size - 1)).log()
        logits[:, : self.start, self.eos] = -torch.inf
        logits[:, self.start :, self.eos] = torch.tensor(self.p).log()
        return SimpleNamespace(logits=logits)


def test_the_probe_reads_eos_where_the_reference_ends_and_skips_cut_examples(tokenizer):
    record = {"instruction": "Name a colour.", "output": "Blue."}
    length = len(encode_example(tokenizer, record, 512)["input_ids"])
    # position length - 2 predicts the EOS that ends the example; every earlier one a reference token
    model = StopsFrom(len(tokenizer), tokenizer.eos_token_id, start=length - 2, p=0.25)
    cut = {**record, "output": "Blue. " * 100}  # longer than max_length: no end to read
    found = eos_probabilities(model, tokenizer, [record, cut], max_length=length + 5)
    assert found["p_eos_end"] == [pytest.approx(0.25)]
    assert found["p_eos_inside"] == [0.0]


def test_probed_models_replace_their_rows_and_the_others_stay():
    def row(model, value):
        return {"model": model, "metric": "p_eos_end", "statistic": "mean", "value": value}

    old = [row("teacher", "0.2"), row("ce-seed1", "0.3")]
    assert merged(old, [row("ce-seed1", "0.4"), row("rkl-tau1-seed1", "0.05")]) == [
        row("teacher", "0.2"), row("ce-seed1", "0.4"), row("rkl-tau1-seed1", "0.05"),
    ]
