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
