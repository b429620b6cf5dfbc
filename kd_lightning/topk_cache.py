"""The top-k teacher cache: per counted position, the teacher's K largest log-probabilities.

For teachers too large to keep beside the student or to cache whole. ``kd-cache …
cache.format=topk cache.top_k=K`` stores, for every counted position, the K largest
log-probabilities at τ = 1 (float16 by default), their ids packed to the bits the
vocabulary needs (⌈log₂ V⌉: 16 for 49,152 ids, 18 for 151,936), and the log of the tail
mass ``log Σ_{x ∉ top-K} p_x`` (float32). Training reads them as ``losses.TopKTargets``:
the divergence on K + 1 outcomes, no teacher lm_head anywhere.

Bytes per token: ``K · 2 + ⌈K · bits / 8⌉ + 4`` (36 at K = 8 for SmolLM2, against 2,304
for its float32 hidden states). The layout, fingerprint, manifest, atomic shards and
resumable build are the exact cache's (``cache``); the shards hold ``log_probs``
``[tokens, K]``, ``ids`` ``[tokens, ⌈K · bits / 8⌉]`` uint8 and ``tail_log_mass`` ``[tokens]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.cache import FINGERPRINT_FIELDS, StoredTeacher, TeacherCacheWriter
from kd_lightning.losses import TopKTargets
from kd_lightning.models import lm_head

TOPK_DTYPES = ("float16", "float32")
#: counted positions whose logits are computed at once when the cache is built
ROWS_PER_PASS = 256


def id_bits(vocab_size: int) -> int:
    """The bits an id of a ``vocab_size`` vocabulary needs: ⌈log₂ V⌉, at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """``[n, K]`` ids → ``[n, ⌈K · bits / 8⌉]`` uint8: each id's ``bits`` bits, least
    significant first, one row per token (rows start on a byte)."""
    flags = (ids.unsqueeze(-1) >> torch.arange(bits, device=ids.device)) & 1
    flags = F.pad(flags.flatten(1), (0, -ids.shape[1] * bits % 8)).view(len(ids), -1, 8)
    return (flags << torch.arange(8, device=ids.device)).sum(-1).to(torch.uint8)


def unpack_ids(packed: Tensor, top_k: int, bits: int) -> Tensor:
    """The inverse of ``pack_ids``: ``[n, K]`` int64 ids."""
    flags = (packed.unsqueeze(-1).to(torch.int64) >> torch.arange(8, device=packed.device)) & 1
    flags = flags.flatten(1)[:, : top_k * bits].view(len(packed), top_k, bits)
    return (flags << torch.arange(bits, device=packed.device)).sum(-1)


@torch.no_grad()
def top_log_probs(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K largest log-probabilities of ``logits`` ``[n, V]`` at τ = 1, their ids and the
    log of the rest's mass (``logsumexp`` of the rest: exact, −inf when K = V), in float32."""
    log_probs = torch.log_softmax(logits.float(), -1)
    values, ids = log_probs.topk(top_k, -1)
    tail = torch.logsumexp(log_probs.scatter(-1, ids, -torch.inf), -1)
    return values, ids, tail


def check_top_k(top_k: int, vocab_size: int) -> None:
    """Raise ``ValueError`` naming ``cache.top_k`` unless 1 ≤ K ≤ V."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"cache.top_k must be a whole number >= 1, got {top_k!r}")
    if top_k > vocab_size:
        raise ValueError(f"cache.top_k={top_k} exceeds the teacher's vocabulary of {vocab_size} ids: use cache.top_k<={vocab_size}")


class TopKCacheWriter(TeacherCacheWriter):
    """Writes a top-k cache: the fingerprint's ``top_k`` largest log-probabilities per counted
    position, over the first ``vocab_size`` logits (the tokenizer's; rows beyond are padding)."""

    storage_dtypes = TOPK_DTYPES

    def __init__(self, directory, fingerprint: dict, vocab_size: int):
        check_top_k(fingerprint["top_k"], vocab_size)
        super().__init__(directory, fingerprint)
        self.vocab_size = vocab_size

    def write_teacher_parts(self, teacher: nn.Module) -> None:
        """Nothing: training from top-k outputs needs no part of the teacher."""

    def layout(self, teacher: nn.Module) -> dict:
        return {"top_k": self.fingerprint["top_k"], "vocab_size": self.vocab_size, "id_bits": id_bits(self.vocab_size)}

    def outputs(self, teacher: nn.Module, counted_states: Tensor) -> dict[str, Tensor]:
        head, dtype = lm_head(teacher), getattr(torch, self.fingerprint["dtype"])
        parts = {"log_probs": [], "ids": [], "tail_log_mass": []}
        for states in counted_states.split(ROWS_PER_PASS):
            values, ids, tail = top_log_probs(head(states)[:, : self.vocab_size], self.fingerprint["top_k"])
            parts["log_probs"].append(values.to(dtype).cpu())
            parts["ids"].append(pack_ids(ids, id_bits(self.vocab_size)).cpu())
            parts["tail_log_mass"].append(tail.cpu())
        return {name: torch.cat(tensors) for name, tensors in parts.items()}


class TopKCachedTeacher(StoredTeacher):
    """The top-k cache as a teacher source: ``counted_outputs(batch)`` gives the
    ``losses.TopKTargets`` of the counted positions. It has no lm_head and no parameters.

    The run's fingerprint is compared on what the teacher's outputs depend on; how they
    are stored (``dtype``, ``format``, ``top_k``) is the cache's own.
    """

    output_names = ("log_probs", "ids", "tail_log_mass")
    compared_fields = tuple(field for field in FINGERPRINT_FIELDS if field != "dtype")

    def __init__(self, directory, fingerprint: dict | None = None, verify: bool = True):
        super().__init__(directory, fingerprint, verify)
        self.top_k, self.vocab_size, self.id_bits = (self.manifest[key] for key in ("top_k", "vocab_size", "id_bits"))
        # moves with the module, so that the targets reach the student's device
        self.register_buffer("device_marker", torch.empty(0), persistent=False)

    def describe(self) -> str:
        return f"top {self.cached_fingerprint['top_k']} {self.cached_fingerprint['dtype']} log-probabilities"

    def get_output_embeddings(self) -> None:
        return None

    def counted_outputs(self, batch: dict) -> TopKTargets:
        """The top-k targets of the counted positions of a batch (``counted_rows``), in float32."""
        rows, device = self.counted_rows(batch), self.device_marker.device
        return TopKTargets(
            log_probs=rows["log_probs"].to(device, torch.float32),
            ids=unpack_ids(rows["ids"].to(device), self.top_k, self.id_bits),
            tail_log_mass=rows["tail_log_mass"].to(device, torch.float32),
            vocab_size=self.vocab_size,
        )
