"""The later positions of multi-token groups in training (SPEC §6): GOLD's merge (``gold``,
``uld`` with ``later_positions=merge``) and ``hybrid``'s group-probability term, through
the chunked head, against a float64 reference that computes every position's logits and
sums each group's later tokens in a loop; loss and student gradients."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_lightning import DistillationModule, losses
from kd_lightning.cross_tokenizer import CrossTokenizer, tokenizer_match
from kd_lightning.data.cross_tokenizer import CrossTokenizerDataModule
from kd_lightning.heads import GlobalMean
from kd_lightning.losses.group_terms import LaterTokens
from kd_lightning.tokens import TokenBatch
from test_cross_tokenizer_training import cross_dirs, write_records  # noqa: F401 (cross_dirs is a fixture)

TAU = 1.5
CASES = [("gold", {}), ("uld", {"later_positions": "merge"}), ("hybrid", {"later_positions": "group_probability"})]


@pytest.fixture(scope="module")
def cross_batch(cross_dirs, tmp_path_factory):
    teacher_tokenizer, student_tokenizer = (AutoTokenizer.from_pretrained(path) for path in cross_dirs)
    path = write_records(tmp_path_factory.mktemp("later") / "d.jsonl")
    data = CrossTokenizerDataModule(student_tokenizer, teacher_tokenizer, path=path, max_length=170, val_size=0,
                                    batch_size=4, shuffle=False)
    data.setup()
    return next(iter(data.train_dataloader())), tokenizer_match(teacher_tokenizer, student_tokenizer)


def side_terms(logits: torch.Tensor, ids: torch.Tensor, first_positions, sizes, floor):
    """The first positions' logits and, per group, Σ_{k≥1} max(log softmax(z/τ)[x_k], floor), in a loop."""
    sums = []
    for first, size in zip(first_positions.tolist(), sizes.tolist()):
        total = logits.new_zeros(())
        for k in range(1, size):
            value = torch.log_softmax(logits[first + k] / TAU, -1)[ids[first + k + 1]]
            total = total + (value.clamp_min(floor) if floor is not None else value)
        sums.append(total)
    return logits[first_positions], torch.stack(sums), ids[first_positions + 1]


def reference_loss(name, params, student, teacher, batch, match):
    floor = math.log(1e-8) if name == "gold" or params.get("later_positions") == "merge" else None
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    student_first, student_sums, student_ids = side_terms(
        student_logits[:, : match.student_vocabulary], batch["input_ids"].flatten(), batch["group_student_positions"],
        batch["group_student_sizes"], floor)
    teacher_first, teacher_sums, teacher_ids = side_terms(
        teacher_logits.flatten(0, 1)[:, : match.teacher_vocabulary], batch["teacher_input_ids"].flatten(),
        batch["group_teacher_positions"], batch["group_teacher_sizes"], floor)
    later = LaterTokens(student_sums, teacher_sums, student_ids, teacher_ids, batch["group_student_sizes"], batch["group_teacher_sizes"])
    objective = losses.cross_tokenizer.objective(name, losses.get("fkl"), **params)
    scale = TAU**2 if objective.scaled_by_tau_sq else 1.0
    return scale * objective(student_first, teacher_first, match, TAU, later).mean()


@pytest.mark.parametrize("loss_impl", ["fused", "eager"])
@pytest.mark.parametrize("name, params", CASES)
def test_later_positions_through_the_head_equal_the_reference(cross_dirs, cross_batch, name, params, loss_impl):
    batch, match = cross_batch
    assert (batch["group_student_sizes"] > 1).any() and (batch["group_teacher_sizes"] > 1).any()
    results = []
    for through_head in (True, False):
        teacher, student = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64) for path in cross_dirs)
        if through_head:
            module = DistillationModule(student, teacher, temperature=TAU, chunk_size=3, loss_impl=loss_impl,
                                        cross_tokenizer=CrossTokenizer(name, match, params))
            loss = module.distillation_losses(batch, apply_policies=False)["loss"]
        else:
            loss = reference_loss(name, params, student, teacher, batch, match)
        loss.backward()
        results.append((loss.detach(), [parameter.grad for parameter in student.parameters()]))
    (head_loss, head_gradients), (reference, reference_gradients) = results
    torch.testing.assert_close(head_loss, reference, rtol=1e-9, atol=0)
    for got, expected in zip(head_gradients, reference_gradients):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name, params", CASES)
def test_an_upstream_gradient_the_forward_pass_did_not_foresee_is_computed_again(cross_dirs, cross_batch, name, params):
    """The fused head computes its gradients in the forward pass at the loss's weights; an
    upstream gradient not proportional to them (here random per group, some groups dropped)
    gets the eager head's gradients all the same."""
    batch, match = cross_batch
    gradients = []
    for loss_impl in ("fused", "eager"):
        teacher, student = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64) for path in cross_dirs)
        head = CrossTokenizer(name, match, params).head(student, teacher, batch, losses.get("fkl"), 0.0, chunk_size=3,
                                                         loss_impl=loss_impl)
        assert (head.student_weight is not None) == (loss_impl == "fused")
        keep = torch.arange(head.units) % 4 != 1
        tokens = TokenBatch(torch.full((head.units,), TAU), keep, 0, head.difficulty)
        weights = tokens.loss_weights(True)
        per_group, _ = head.kept_losses(tokens, weights, GlobalMean(1, keep.sum(), torch.tensor(1)))
        upstream = torch.rand(len(per_group), generator=torch.Generator().manual_seed(0), dtype=per_group.dtype)
        (per_group * upstream).sum().backward()
        gradients.append([parameter.grad for parameter in student.parameters()])
    for fused, eager in zip(*gradients):
        torch.testing.assert_close(fused, eager, rtol=1e-7, atol=1e-12)


def test_the_merge_changes_the_loss(cross_dirs, cross_batch):
    """ULD with GOLD's merge is not ULD of the first positions. (kd-train with the merge end to
    end: test_cross_tokenizer_training's gold run.)"""
    batch, match = cross_batch
    values = []
    for params in ({}, {"later_positions": "merge"}):
        teacher, student = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64) for path in cross_dirs)
        module = DistillationModule(student, teacher, temperature=TAU, cross_tokenizer=CrossTokenizer("uld", match, params))
        values.append(float(module.distillation_losses(batch, apply_policies=False)["loss"].detach()))
    assert abs(values[0] - values[1]) > 1e-6


def test_an_unknown_later_positions_is_refused(cross_batch):
    with pytest.raises(ValueError, match="unknown later_positions 'merge'; valid choices: none, group_probability"):
        CrossTokenizer("hybrid", cross_batch[1], {"later_positions": "merge"})
