"""Model specs: alias, GGUF file, folder, hub id; the GGUF cache; the frozen reference."""

from __future__ import annotations

import pytest
import torch

from preftune import models


def test_alias_resolves_to_the_gguf_inside_the_package():
    source = models.resolve("smollm2-135m-instruct")
    assert source.kind == "alias"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_path_resolves_and_reuses_the_dequantized_cache(smollm_folder):
    alias = models.resolve("smollm2-135m-instruct")
    by_path = models.resolve(f"{alias.location}/{alias.gguf_file}")
    assert by_path.kind == "gguf"
    before = (smollm_folder / "model.safetensors").stat().st_mtime_ns
    assert models.dequantized_copy(by_path) == smollm_folder  # same file, same cache entry
    assert (smollm_folder / "model.safetensors").stat().st_mtime_ns == before  # not rewritten


def test_dequantized_copy_loads_without_gguf_marker(smollm_folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm_folder)
    assert getattr(config, "quantization_config", None) is None
    assert config.model_type == "llama" and config.vocab_size == 49152


def test_folder_and_hub_specs(tiny_llama_folder, tmp_path):
    assert models.resolve(str(tiny_llama_folder)).kind == "folder"
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == models.ModelSource(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelError, match="not found"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(models.ModelError, match="not found"):
        models.resolve("./no/such/folder")


def test_hub_id_that_cannot_be_fetched_gets_a_clear_error(monkeypatch):
    """The hub is not contacted in tests: the download fails as it does offline."""
    from transformers import AutoTokenizer

    def offline(name, **kwargs):
        assert name == "preftune-tests/no-such-model"
        raise OSError("We couldn't connect to the hub to load this file")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(models.ModelError, match="could not be loaded from the hub"):
        models.load("preftune-tests/no-such-model")


def test_dropout_is_disabled_and_reference_is_frozen(gpt2_folder):
    policy, _ = models.load(str(gpt2_folder))
    dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    reference = models.frozen_copy(policy)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    for (name, a), (_, b) in zip(policy.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(reference.parameters()))


def test_remote_code_is_off_by_default(tiny_llama_folder, monkeypatch):
    seen = {}
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load(str(tiny_llama_folder))
    assert seen["trust_remote_code"] is False
