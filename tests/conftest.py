"""Shared fixtures: the embedded tokenizer, tiny random models, and the real HH data.

Tiny models use the embedded SmolLM2 tokenizer (or a byte-level BPE tokenizer trained here
in a second) so that tests exercise real tokenization while each forward pass is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HH_FILE = REPO.parent / "shared" / "data" / "hh-harmless-test.jsonl.gz"

# Keep thread counts stable so numerical comparisons repeat across runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """The train and held-out files of training_runs.py, written once and only read."""
    from training_runs import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="session")
def hh_file() -> Path:
    if not HH_FILE.is_file():
        pytest.skip(f"real HH data not found at {HH_FILE} (expected ../shared beside the repo)")
    return HH_FILE


@pytest.fixture(scope="session")
def smollm_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (dequantized once)."""
    from preftune import models

    source = models.resolve("smollm2-135m-instruct")
    return models.dequantized_copy(source)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smollm_tokenizer) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer and chat template, saved to disk."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = _tiny_llama(len(smollm_tokenizer))
    model.save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_llama(tiny_llama_folder):
    from preftune import models

    return models.load(str(tiny_llama_folder))


def _train_bpe(special: list[str], bos: str | None):
    """A small byte-level BPE tokenizer trained on a few sentences; adds ``bos`` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Human: How do I boil an egg? Assistant: Put it in boiling water for nine minutes.",
        "The quick brown fox jumps over the lazy dog. A preference pair has two responses.",
        "Chosen answers are short. Rejected answers ramble on and on about nothing at all.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok, PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def bos_tokenizer():
    """A Llama-style tokenizer: adds <s> at the start, closes with </s>, no chat template."""
    tok, fast = _train_bpe(["<unk>", "<s>", "</s>"], bos="<s>")
    return fast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a GPT-2-style tokenizer (no BOS added, <|endoftext|> as EOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, fast = _train_bpe(["<|endoftext|>"], bos=None)
    tokenizer = fast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
