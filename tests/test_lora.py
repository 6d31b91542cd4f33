"""LoRA training: one copy of the base weights, the ln 2 start, saving, merging, checkpoints,
continuing an adapter, and inspecting a LoRA run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from training_runs import assert_same_weights, metric_rows, train_args

from preftune import lora, models
from preftune.cli import main
from preftune.config import ConfigError, TrainConfig
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import PairTokenizer
from preftune.logps import sequence_logps

LORA = ["--lora", "--lora-r", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_folder, pairs):
    """8 LoRA steps with --merge; deep-copying a model (a second copy of it) is refused."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "frozen_copy", _refuse_copy)
        assert main(train_args(tiny_llama_folder, pairs, out, *LORA, "--merge")) == 0
    return out


def _refuse_copy(model):
    raise AssertionError("a LoRA run made a second copy of the model")


def _batch(tokenizer):
    pt = PairTokenizer(tokenizer, 64)
    texts = [("Q: colour?", " Red", " The quick brown fox."), ("Q: a pet?", " A cat.", " Dog")]
    return collate_pairs([pt(PreferencePair(p, c, r, "t", i))[0]
                          for i, (p, c, r) in enumerate(texts)], tokenizer.pad_token_id)


def _logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model.eval(), batch)


def test_the_reference_is_the_policy_with_its_adapter_off(tiny_llama):
    """Same weights in memory, the base model's log-probs however the adapter moves."""
    model, tokenizer = tiny_llama
    batch = _batch(tokenizer)
    base_logps = _logps(model, batch)
    base_weight = model.model.layers[0].self_attn.q_proj.weight
    policy = lora.add_adapter(model, 4, 8.0, 0.0, ["auto"])
    reference = lora.reference_of(policy)
    # B starts at zero: the adapted model computes what the base did.
    assert torch.equal(_logps(policy, batch), base_logps)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert not torch.allclose(_logps(policy, batch), base_logps, atol=1e-3)
    assert torch.equal(_logps(reference, batch), base_logps)
    # The reference owns nothing: its base weights are the policy's tensors.
    reference_weight = dict(reference.state_dict())[
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert reference_weight.data_ptr() == base_weight.data_ptr()
    assert not any("lora_" in name for name in reference.state_dict())
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    reference.requires_grad_(False)  # a no-op: the policy's adapter stays trainable
    assert all(p.requires_grad for name, p in policy.named_parameters() if name in trainable)


def test_auto_targets_every_projection_of_llama_and_gpt2(tiny_llama, gpt2_folder):
    model, _ = tiny_llama
    assert lora.target_modules(model, ["auto"]) == list(lora.LLAMA_STYLE_TARGETS)
    gpt2, _ = models.load(str(gpt2_folder))
    assert lora.target_modules(gpt2, ["auto"]) == ["c_attn", "c_proj", "c_fc"]
    assert lora.target_modules(gpt2, ["c_attn"]) == ["c_attn"]
    wrapped = lora.add_adapter(gpt2, 2, 4.0, 0.0, ["auto"])
    adapted = {name.split(".")[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    with pytest.raises(ValueError, match="--lora-target-modules"):
        lora.add_adapter(models.load(str(gpt2_folder))[0], 2, 4.0, 0.0, ["no_such_module"])


def test_lora_run_starts_at_ln2_and_its_loss_falls(lora_run):
    rows = metric_rows(lora_run)
    train = [r for r in rows if "loss" in r]
    held = [r for r in rows if "eval/loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert held[0]["step"] == 0 and held[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert held[-1]["eval/loss"] < math.log(2) - 0.01
    assert sum(r["loss"] for r in train[-3:]) / 3 < math.log(2) - 0.01


def test_saved_adapter_and_merged_model_reproduce_the_trained_policy(lora_run):
    """The final evaluation logged the trained policy's log-probs of each held-out pair."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, lora_run / "model")
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "model-merged")
    assert not (lora_run / "model" / "config.json").exists()  # an adapter, not a full copy

    import yaml

    from preftune.config import build_config
    from preftune.data.pipeline import prepare_data
    from preftune.data.report import DataReport

    cfg = build_config(yaml.safe_load((lora_run / "config.yaml").read_text()))
    _, tokenizer = models.load(str(lora_run / "model-merged"))
    _, held = prepare_data(cfg, tokenizer, DataReport())
    logged = [json.loads(line) for line in (lora_run / "eval_pairs.jsonl").read_text().splitlines()]
    final = [row for row in logged if row["step"] == 8]
    expected = torch.tensor([[r["policy_chosen_logps"] for r in final],
                             [r["policy_rejected_logps"] for r in final]]).flatten()
    batch = collate_pairs(held, tokenizer.pad_token_id)
    for model in (adapted, merged):
        torch.testing.assert_close(_logps(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_checkpoints_hold_adapter_weights_only_and_resume_equals_the_unbroken_run(
    tmp_path, tiny_llama_folder, pairs, lora_run, monkeypatch
):
    saved = load_file(lora_run / "checkpoints" / "step-8" / "model.safetensors")
    assert saved and all("lora_A" in name or "lora_B" in name for name in saved)
    out = tmp_path / "run"
    monkeypatch.setenv("PREFTUNE_TEST_SIGNAL_IN_SAVE", "4:SIGINT")  # stops the run early
    assert main(train_args(tiny_llama_folder, pairs, out, *LORA, "--merge")) == 130
    monkeypatch.delenv("PREFTUNE_TEST_SIGNAL_IN_SAVE")
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert metric_rows(out) == metric_rows(lora_run)
    assert_same_weights(out / "model" / "adapter_model.safetensors",
                        lora_run / "model" / "adapter_model.safetensors")


def test_continuing_an_adapter_keeps_it_as_the_reference(tmp_path, lora_run, pairs):
    """The step-0 loss is ln 2 against the starting adapter, not against the bare base."""
    adapter = str(lora_run / "model")
    policy, tokenizer = lora.load_adapter_for_training(adapter)
    reference = lora.reference_of(policy)
    merged, _ = models.load(adapter)  # the starting adapter, merged into its base
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logps(reference, batch), _logps(merged, batch),
                               rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the copy stays frozen

    out = tmp_path / "run"
    code = main(train_args(adapter, pairs, out, *LORA, "--max-steps", "2",
                           "--no-precompute-reference"))
    assert code == 0
    rows = metric_rows(out)
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[2]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the adapter moved


def test_eval_of_a_lora_run_loads_base_plus_adapter(lora_run):
    from preftune.data.report import DataReport
    from preftune.evaluate import evaluate
    from preftune.runs import eval_pairs, open_run

    run = open_run(str(lora_run))
    assert lora.is_lora(run.policy) and isinstance(run.reference, lora.AdapterReference)
    assert run.reference.policy is run.policy  # one model, the base weights once
    result = evaluate(run.policy, run.loss_reference, eval_pairs(run, None, DataReport()),
                      run.params, 2, run.pad_id, options=run.step_options)
    final = next(r for r in metric_rows(lora_run) if r.get("step") == 8 and "eval/loss" in r)
    assert result.metrics["loss"] == pytest.approx(final["eval/loss"], abs=1e-5)
    assert result.metrics["rewards/margins"] == pytest.approx(final["eval/rewards/margins"],
                                                              abs=1e-5)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"merge": True}, "--merge needs --lora"),
        ({"lora_r": 0}, "--lora-r must be >= 1"),
        ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
        ({"lora_alpha": 0.0}, "--lora-alpha"),
        ({"lora_target_modules": " , "}, "--lora-target-modules"),
    ],
)
def test_bad_lora_settings_name_the_flag(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(**values)


def test_policy_and_reference_views_both_pack(tiny_llama):
    """The reference view reads the policy's config, so both score packed rows."""
    from preftune.forward import StepOptions, layout, model_logps
    from preftune.logps import packing_is_exact

    model, tokenizer = tiny_llama
    policy = lora.add_adapter(model, 4, 8.0, 0.0, ["auto"])
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    reference = lora.reference_of(policy)
    assert packing_is_exact(policy) and packing_is_exact(reference)
    pairs = [PreferencePair("Q: colour?", " Red", " The sky is blue.", "t", 0)]
    pairs = [PairTokenizer(tokenizer, 48)(p)[0] for p in pairs]
    naive = StepOptions(concat_forward=False, head_only=False, prefix_sharing=False,
                        packing=False)
    for model_ in (policy, reference):
        packed = layout(model_, pairs, tokenizer.pad_token_id, StepOptions())
        assert packed[0].segments is not None
        with torch.no_grad():
            torch.testing.assert_close(
                model_logps(model_, packed, StepOptions()),
                model_logps(model_, layout(model_, pairs, tokenizer.pad_token_id, naive), naive),
                rtol=1e-5, atol=1e-5)


def test_saving_an_adapter_never_looks_the_base_up_on_the_hub(tiny_llama, tmp_path,
                                                              monkeypatch):
    import peft.utils.save_and_load as peft_save

    def no_hub(*args, **kwargs):
        raise AssertionError("saving looked the base model up on the hub")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    policy = lora.add_adapter(tiny_llama[0], 4, 8.0, 0.0, ["auto"])
    lora.save_adapter(policy, tmp_path, "smollm2-135m-instruct")  # a name, not a folder
    assert (tmp_path / "adapter_model.safetensors").exists()
