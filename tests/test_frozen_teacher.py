"""Lightning's eval-mode warning: not for the frozen teacher, still for anything else."""

import warnings

from test_module import make_module, trainer

from kd_lightning.models import tiny_causal_lm

EVAL_MODE_WARNING = "module(s) in eval mode at the start of training"


def warnings_of_fit(module, datamodule, tmp_path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1).fit(module, datamodule=datamodule)
    return [str(warning.message) for warning in caught]


def test_a_frozen_teacher_alone_gives_no_eval_mode_warning(datamodule, tmp_path):
    shown = warnings_of_fit(make_module(), datamodule, tmp_path)
    assert not [message for message in shown if EVAL_MODE_WARNING in message]
    assert not [entry for entry in warnings.filters if "eval mode" in str(entry[1])]  # the filter is gone after the check


def test_a_student_module_in_eval_mode_is_still_warned_of(datamodule, tmp_path):
    student = tiny_causal_lm(num_layers=1, hidden_size=32, seed=2)
    stuck = student.model.layers[0].mlp
    stuck.eval()
    stuck.train = lambda mode=True: stuck  # stays in eval mode when the module switches the student to training
    shown = warnings_of_fit(make_module(student=student), datamodule, tmp_path)
    assert [message for message in shown if EVAL_MODE_WARNING in message]
