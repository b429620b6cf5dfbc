"""Values shared across kd_lightning: the label that is not counted and the plain prompt templates."""

#: labels equal to this are not counted in any loss (prompt tokens, padding), as in Hugging Face
IGNORE_INDEX = -100

#: the Alpaca-style prompt of an instruction, for tokenizers without a chat template
PLAIN_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: the same, for an instruction with an input
PLAIN_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
