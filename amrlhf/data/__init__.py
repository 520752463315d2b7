"""Datasets, collation (chat template, prompt/response masks, padding) and DataModules."""

from amrlhf.data.collate import Collator, pad_rows
from amrlhf.data.datamodule import PreferenceDataModule, SFTDataModule
from amrlhf.data.records import Example, read_examples
from amrlhf.data.tokenize import ChatEncoder, encode_examples

__all__ = ["Collator", "pad_rows", "PreferenceDataModule", "SFTDataModule", "Example", "read_examples",
           "ChatEncoder", "encode_examples"]
