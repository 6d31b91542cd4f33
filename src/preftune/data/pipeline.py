"""From config to tokenized training and held-out pairs, with one report of what was dropped."""

from __future__ import annotations

import random
from importlib import resources

from preftune.config import TrainConfig
from preftune.data.report import DataReport
from preftune.data.sources import load_pairs
from preftune.data.tokenize import PairTokenizer, TokenizedPair, tokenize_pairs

DEMO = "demo"


def demo_file(split: str) -> str:
    """Path of the embedded demo dataset's ``train`` or ``eval`` split."""
    return str(resources.files("preftune.data") / "demo" / f"{split}.jsonl")


def resolve_data(spec: str, split: str) -> str:
    return demo_file(split) if spec == DEMO else spec


def prepare_data(
    cfg: TrainConfig, tokenizer, report: DataReport
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, check, split and tokenize the training and held-out pairs."""
    train_pairs = load_pairs(
        resolve_data(cfg.data, "train"), split=cfg.data_split, report=report,
        on_bad_record=cfg.on_bad_record, limit=cfg.limit,
    )
    if cfg.eval_data is not None or cfg.data == DEMO:
        eval_spec = cfg.eval_data if cfg.eval_data is not None else demo_file("eval")
        eval_pairs = load_pairs(
            resolve_data(eval_spec, "eval"), split=cfg.eval_split, report=report,
            on_bad_record=cfg.on_bad_record,
        )
    elif cfg.eval_fraction == 0:
        eval_pairs = []
    else:
        # Hold out a seeded random share; the rest stays in file order for training.
        n_eval = max(1, round(cfg.eval_fraction * len(train_pairs)))
        if n_eval >= len(train_pairs):
            raise ValueError(
                f"{cfg.data}: {len(train_pairs)} usable pair(s) is too few to hold out "
                "an evaluation split; pass --eval-data"
            )
        held = set(random.Random(cfg.seed).sample(range(len(train_pairs)), n_eval))
        eval_pairs = [p for i, p in enumerate(train_pairs) if i in held]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    pair_tokenizer = PairTokenizer(tokenizer, cfg.max_length, cfg.chat_template)
    train = tokenize_pairs(train_pairs, pair_tokenizer, report, cfg.on_bad_record)
    held_out = tokenize_pairs(eval_pairs, pair_tokenizer, report, cfg.on_bad_record)
    if not train:
        raise ValueError(f"{cfg.data}: no training pair is left after tokenization; "
                         "see data_report.json")
    return train, held_out[: cfg.max_eval_pairs]
