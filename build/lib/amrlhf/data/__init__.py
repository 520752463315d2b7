"""Datasets, collation (chat template, prompt/response masks, padding) and DataModules."""

from amrlhf.data.collate import Collator, PromptCollator, pad_rows
from amrlhf.data.datamodule import PreferenceDataModule, PromptDataModule, SFTDataModule
from amrlhf.data.records import Example, read_examples
from amrlhf.data.tokenize import ChatEncoder, encode_examples, encode_prompts

__all__ = ["Collator", "PromptCollator", "pad_rows", "PreferenceDataModule", "PromptDataModule", "SFTDataModule",
           "Example", "read_examples", "ChatEncoder", "encode_examples", "encode_prompts"]
