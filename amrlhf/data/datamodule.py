"""DataModules for preference pairs and SFT examples.

Sources: a JSONL file, a prepared asset (`local:halueval_dialogue/train`), or a hub dataset
(`org/name[:split]`). Rows are validated (errors name file, line and field), tokenized once,
and length filtering is reported (logged and exposed in `report` for tracking).
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
from torch.utils.data import DataLoader

from amrlhf.data.collate import Collator, PromptCollator
from amrlhf.data.records import read_examples
from amrlhf.data.sampler import ResumableSampler
from amrlhf.data.tokenize import encode_examples, encode_prompts
from amrlhf.errors import AmrlhfError, ConfigError

log = logging.getLogger(__name__)
# Lightning warns that a run resumed inside an epoch may train "unreliable results" unless the DataLoader holds a
# state_dict. Ours need not: ResumableSampler skips exactly the batches the checkpoint had trained on (the resume
# tests in tests/test_cli.py compare every loss with an uninterrupted run's).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class _TextDataModule(L.LightningDataModule):
    kind = "preference"

    def __init__(
        self,
        train: str,
        val: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        token_scores: bool = False,
        skip_train: int = 0,
    ):
        """
        Args:
            train: training rows: JSONL path, `local:ASSET/PART`, or hub dataset `org/name[:split]`.
            val: held-out rows (same forms); metrics are logged under `eval/`.
            tokenizer: tokenizer name; by default the policy's (filled in by the CLI).
            max_length: prompt + response tokens; longer responses are cut, prompts that leave no
                room are dropped; both are counted and reported.
            batch_size: examples (pairs, for preferences) per micro-batch and device.
            limit_train: read at most this many training rows.
            skip_train: training rows passed over before reading (with `limit_train`, a slice of a file: e.g.
                the fits of a scorer on rows no DPO run of the same file reads).
            seed: data order seed (epoch 0 uses seed, epoch e > 0 a hash of (seed, e): `sampler.epoch_seed`).
            token_scores: rows carry per-token scores (`chosen_token_scores`, ...) for DatasetScorer.
        """
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("limit_train", limit_train),
                            ("limit_val", limit_val)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        if isinstance(skip_train, bool) or not isinstance(skip_train, int) or skip_train < 0:
            raise ConfigError(f"data.skip_train must be an integer >= 0, got {skip_train!r}")
        self.skip_train = skip_train
        self.train_source, self.val_source = train, val
        self.tokenizer_name = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.limit_train, self.limit_val = limit_train, limit_val
        self.seed, self.shuffle = seed, shuffle
        self.with_token_scores = token_scores
        self.train_data = self.val_data = None
        self.report: dict[str, int] = {}
        self._sampler: ResumableSampler | None = None
        self._resume: dict | None = None
        self.tokenizer = None

    def _load(self, source: str, limit: int | None, name: str, skip: int = 0):
        examples = read_examples(source, self.kind, limit, skip=skip, token_scores=self.with_token_scores,
                                 prompt_template=getattr(self, "prompt_template", None),
                                 completion_field=getattr(self, "completion_field", None),
                                 span_fields=getattr(self, "span_labels", None))
        encode = encode_prompts if self.kind == "prompt" else encode_examples
        encoded, rep = encode(examples, self.tokenizer, self.max_length)
        log.info(rep.describe(f"{name} ({source})", self.max_length))
        self.report.update(rep.as_dict(f"data/{name}"))
        if not encoded:
            raise AmrlhfError(f"{source}: every row was dropped by max_length={self.max_length}")
        return encoded

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        if self.tokenizer is None:
            from amrlhf.models import load_tokenizer

            if not self.tokenizer_name:
                raise AmrlhfError("data.tokenizer is not set (and no model name was given to default it)")
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.train_data = self._load(self.train_source, self.limit_train, "train", self.skip_train)
        if self.val_source:
            self.val_data = self._load(self.val_source, self.limit_val, "val")

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        self._sampler = ResumableSampler(len(self.train_data), seed=self.seed, shuffle=self.shuffle, rank=rank,
                                         world_size=world)
        left = len(self._sampler) % self.batch_size
        if left or len(self.train_data) % world:
            log.info("each epoch skips %d of %d training examples (last incomplete batch; a new order each epoch)",
                     left * world + len(self.train_data) % world, len(self.train_data))
        if len(self._sampler) < self.batch_size:
            raise AmrlhfError(f"{len(self.train_data)} training examples are fewer than one batch "
                              f"({self.batch_size} x {world} devices)")
        if self._resume:
            self._sampler.resume(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = None
        return DataLoader(self.train_data, batch_size=self.batch_size, sampler=self._sampler,
                          collate_fn=self.collator(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_data is None:
            return []
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        if len(self.val_data) % world:
            log.warning("validation uses %d of %d examples (equal shares for %d devices)",
                        len(self.val_data) - len(self.val_data) % world, len(self.val_data), world)
        # each rank validates its own share; metrics are reduced across ranks (sync_dist)
        sampler = ResumableSampler(len(self.val_data), seed=0, shuffle=False, rank=rank, world_size=world)
        return DataLoader(self.val_data, batch_size=self.eval_batch_size, sampler=sampler,
                          collate_fn=self.collator())

    # Exact resume: remember how many batches of the current epoch were trained on (skipped on resume
    # only if Lightning resumes in that same epoch).
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = dict(state)


class PreferenceDataModule(_TextDataModule):
    """Rows with `prompt`, `chosen`, `rejected` (text, or chat messages; the response is the last
    assistant turn; without `prompt`, the earlier turns of `chosen` are the prompt)."""

    kind = "preference"

    def __init__(self, train: str, val: str | None = None, tokenizer: str | None = None, max_length: int = 512,
                 batch_size: int = 2, eval_batch_size: int | None = None, limit_train: int | None = None,
                 limit_val: int | None = None, seed: int = 0, shuffle: bool = True, token_scores: bool = False,
                 span_labels: dict[str, str] | None = None, skip_train: int = 0):
        """span_labels: per-token flaw labels for a token-level reward model, {side: row field of flawed
        character spans}, e.g. {rejected: rejected_spans, chosen: chosen_flaw_spans}; a side not named has
        none. The batch then carries `token_flawed`. The other arguments: as for every data module."""
        super().__init__(train, val, tokenizer, max_length, batch_size, eval_batch_size, limit_train, limit_val,
                         seed, shuffle, token_scores, skip_train)
        if span_labels is not None and (not span_labels or set(span_labels) - {"chosen", "rejected"}):
            raise ConfigError(f"data.span_labels maps 'chosen' and/or 'rejected' to a row field, got {span_labels!r}")
        self.span_labels = dict(span_labels) if span_labels else None


class SFTDataModule(_TextDataModule):
    """Rows with `prompt` + `completion`, or `messages` (the last assistant turn is trained on); with
    `completion_field`, preference rows trained on one side (`chosen`: right answers, `rejected`: wrong ones,
    e.g. the two models of a ContrastiveScorer)."""

    kind = "sft"

    def __init__(self, train: str, val: str | None = None, tokenizer: str | None = None, max_length: int = 512,
                 batch_size: int = 2, eval_batch_size: int | None = None, limit_train: int | None = None,
                 limit_val: int | None = None, seed: int = 0, shuffle: bool = True, token_scores: bool = False,
                 completion_field: str | None = None, skip_train: int = 0):
        """completion_field: the row field trained on (e.g. `chosen` or `rejected` of preference rows), after
        the row's `prompt`; None: `completion` or `messages`. The other arguments: as for every data module."""
        super().__init__(train, val, tokenizer, max_length, batch_size, eval_batch_size, limit_train, limit_val,
                         seed, shuffle, token_scores, skip_train)
        self.completion_field = completion_field


class PromptDataModule(_TextDataModule):
    """Prompts for PPO and GRPO: rows with `prompt` (text or chat messages), or chat rows (`messages`,
    `chosen`) whose turns before the last assistant turn are the prompt, or any rows with
    `prompt_template` (a format string over the row's fields, e.g. "{question}"); responses are
    ignored, the other fields travel with the prompt (a verifiable reward's reference answer).
    `max_length` here bounds the PROMPT (longer prompts are dropped and counted); the policy adds
    up to its sampling.max_new_tokens."""

    kind = "prompt"

    def __init__(
        self,
        train: str,
        val: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        prompt_template: str | None = None,
        skip_train: int = 0,
    ):
        """
        Args:
            train, val, tokenizer, eval_batch_size, limit_train, limit_val, seed, shuffle, skip_train: as for
                the other data modules.
            max_length: the longest PROMPT, in tokens (longer ones are dropped and counted).
            batch_size: prompts per rollout and device (GRPO samples num_generations of each).
            prompt_template: build each prompt as `prompt_template.format(**row)` (chat-templated like
                a text prompt); a row without a named field is an error naming its file and line.
        """
        super().__init__(train, val, tokenizer, max_length, batch_size, eval_batch_size, limit_train, limit_val,
                         seed, shuffle, skip_train=skip_train)
        self.prompt_template = prompt_template

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id)
