import os

# nothing in the tests may reach a model or data hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from kd_lightning.models import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="session")
def records():
    """A small in-memory instruction data set (a `datasets.Dataset`)."""
    from datasets import Dataset

    rows = [
        {"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else "Colours: red, blue.", "output": f"Blue {i}."}
        for i in range(24)
    ]
    return Dataset.from_list(rows)


@pytest.fixture
def datamodule(tokenizer, records):
    from kd_lightning import InstructionDataModule

    data = InstructionDataModule(tokenizer, dataset=records, max_length=256, val_size=4, batch_size=4)
    data.setup()
    return data


@pytest.fixture
def batch(datamodule):
    return next(iter(datamodule.val_dataloader()))


#: a minimal chat template for the byte tokenizer (it has none of its own)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The byte tokenizer with a chat template."""
    from kd_lightning.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, chat_tokenizer):
    """A tiny 4-layer teacher and 2-layer student written by save_pretrained, each with
    the chat tokenizer: what `model=hf model.teacher_path=… model.student_path=…` reads."""
    from kd_lightning.models import tiny_causal_lm

    root = tmp_path_factory.mktemp("hf")
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 2)):
        tiny_causal_lm("llama", hidden_size=32, num_layers=layers, initializer_range=0.3, seed=seed).save_pretrained(root / name)
        chat_tokenizer.save_pretrained(root / name)
    return root / "teacher", root / "student"
