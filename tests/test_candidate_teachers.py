"""results/candidate_teachers.py: bits per byte, the tokenizer-independent score of a candidate teacher."""

import math
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.data.datamodule import format_prompt
from kd_lightning.models import tiny_causal_lm

sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
from candidate_teachers import bits_per_byte  # noqa: E402


def test_bits_per_byte_is_the_references_nats_per_utf8_byte(chat_tokenizer, records):
    model = tiny_causal_lm("llama", hidden_size=32, num_layers=2, seed=1).eval()
    chosen = [dict(record) for record in records.select(range(3))]
    chosen[0]["output"] = "Bleu clair, ô combien."  # a character of two UTF-8 bytes
    nats, size = 0.0, 0
    for record in chosen:  # transformers' own loss over the reference's tokens, after the chat prompt
        prompt = format_prompt(chat_tokenizer, record["instruction"], record["input"])
        prompt_ids = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response = chat_tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(prompt_ids) + response])
        with torch.no_grad():
            nats += model(torch.tensor([prompt_ids + response]), labels=labels).loss.item() * len(response)
        size += len(record["output"].encode())
    assert bits_per_byte(model, chat_tokenizer, chosen) == pytest.approx(nats / size / math.log(2), rel=1e-5)
