"""Data layer: loaders (standard CSV layout, RecBole atomic files, raw Amazon-2018 dumps, the
built-in synthetic catalogue), prompt building, a tiny BPE tokenizer and collation."""

from . import records
from .collate import Batch, EncodedSample, batch_indices, collate, iterate_batches
from .layout import load_dataset, read_info, read_split, write_standard
from .prompts import IGNORE_INDEX, TEMPLATES, THOUGHT_TOKEN, PromptBuilder
from .recbole import load_recbole
from .records import *  # noqa: F403  (the record types: records.__all__)
from .synthetic import make_synthetic
from .tokenizer import EOS_TOKEN, dataset_corpus, train_tokenizer

__all__ = [
    "load_dataset",
    "read_info",
    "read_split",
    "write_standard",
    "load_recbole",
    "make_synthetic",
    "PromptBuilder",
    "THOUGHT_TOKEN",
    "TEMPLATES",
    "IGNORE_INDEX",
    "EncodedSample",
    "Batch",
    "collate",
    "batch_indices",
    "iterate_batches",
    "train_tokenizer",
    "dataset_corpus",
    "EOS_TOKEN",
]
__all__ += records.__all__
