"""Batched generation from a causal LM: left padding, KV cache, no gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: list[Tensor],
    pad_token_id: int,
    eos_token_id: int,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    top_p: float = 1.0,
    temperature: float = 1.0,
    synced_gpus: bool = False,
) -> list[Tensor]:
    """The tokens ``model`` appends to each prompt (1-D id tensors), up to and including
    the first EOS; sampling with ``top_p`` and ``temperature`` (no top-k), or greedy.

    The prompts are left-padded into one batch, so every row continues from its last
    column; the model runs in eval mode with its KV cache. ``synced_gpus`` keeps every
    process stepping until all are done, which sharded (FSDP) models need.
    """
    was_training = model.training
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature, "top_k": 0} if do_sample else {"do_sample": False}
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            synced_gpus=synced_gpus,
            **sampling,
        )
    finally:
        model.train(was_training)
    continuations = []
    for row in output[:, width:]:
        ends = (row == eos_token_id).nonzero()
        continuations.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return continuations
