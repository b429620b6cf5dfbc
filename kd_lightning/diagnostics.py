"""What a training run should know about itself: the parameter memory of each process,
and what made a loss NaN or +inf (and what to do about it)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from kd_lightning.cache import StoredTeacher
from kd_lightning.heads import LmHeads, counted_states
from kd_lightning.models import local_parameter_bytes

NON_FINITE_LOGITS_FIX = {
    "student": "its weights have diverged: lower module.optimizer.lr (and keep trainer.gradient_clip_val), "
    "or resume from an earlier checkpoint",
    "teacher": "the frozen teacher itself is broken: check that it loads correctly and that its dtype does not "
    "overflow (use float32 or bfloat16)",
}


def non_finite_loss_message(module, batch: dict, out: dict[str, Tensor]) -> str:
    """What made the loss of ``batch`` NaN or +inf, and what to do: the student's logits,
    the teacher's (both recomputed chunk by chunk, without gradient), or else the
    divergence (or the cross-entropy term) on finite logits."""
    value = "NaN" if out["loss"].isnan() else "+inf"
    where = f"the loss is {value} at step {module.global_step}"
    if isinstance(module.student, FSDPModule) and module.world_size() > 1:  # a lone rank must not run FSDP's collectives
        return f"{where}; run on one process to find whether the student's logits, the teacher's or the divergence are"
    if (role_and_bad := non_finite_logits(module, batch)) is not None:
        role, bad = role_and_bad
        return f"{where}: the {role}'s logits are {bad}; {NON_FINITE_LOGITS_FIX[role]}"
    if torch.isfinite(out["kd_loss"]):
        return f"{where}: the cross-entropy term is {value}: a label token has a -inf student logit"
    name = module.divergence.name
    if value == "+inf":
        return (
            f"{where}: the divergence is +inf on finite logits: the student puts mass on tokens the teacher "
            f"rules out (-inf logits), where {name} is infinite; use a bounded divergence "
            "(jsd, tvd, skl, srkl) or give both models the same vocabulary mask"
        )
    return f"{where}: the divergence {name} is NaN on finite logits; try another temperature or divergence"


@torch.no_grad()
def non_finite_logits(module, batch: dict) -> tuple[str, str] | None:
    """The first model (``student`` or ``teacher``) whose logits on ``batch`` hold NaN or
    +inf, and which; ``None`` if both are finite. Chunk by chunk: never the full logits."""
    states = counted_states(module.student, module.teacher, batch)
    heads = LmHeads.of(module.student, module.teacher, module.vocab_size)
    for role, hidden in (("student", states.student), ("teacher", states.teacher)):
        for chunk in hidden.split(module.chunk_size):
            logits = heads.logits(role, chunk)
            for bad, found in (("NaN", logits.isnan()), ("+inf", logits.isposinf())):
                if found.any():
                    return role, bad
    return None


def print_parameter_memory(module) -> None:
    """Print the parameter memory this process holds of teacher and student (shards under
    FSDP); printed, not logged: spawned processes do not inherit Hydra's logging set-up."""
    sizes = {role: local_parameter_bytes(getattr(module, role)) / 2**20 for role in ("teacher", "student")}
    saved = ""
    if isinstance(module.teacher, StoredTeacher):
        saved = f" (read from a cache: the cache saves {module.teacher.live_parameter_bytes / 2**20 - sizes['teacher']:.1f} MiB)"
    print(
        f"process {module.global_rank} of {module.world_size()} holds {sizes['teacher']:.1f} MiB of teacher{saved} "
        f"and {sizes['student']:.1f} MiB of student parameters",
        flush=True,
    )
