"""``FluxDataModule``: tokenised synthetic and/or SFT prompts, served as left-padded batches with task ids.

Sources:

* ``synthetic``: :func:`flux.data.synthetic.make_mixture` for ``tasks`` at ``length_tokens`` (one length or a
  list), ``n_train`` / ``n_val`` examples per task and length, different seeds for the two splits (defaults 1000 and
  1001, away from the evaluation suite's seed 0, which would otherwise redraw the training examples);
* ``jsonl`` / ``parquet`` (the same loader; each file's format follows its suffix): SFT records from
  ``train_files``, validated on ``val_files`` or, when none are given, on ``n_val`` records held out of training;
* ``mixture``: both, with ``weights = {"synthetic": w1, "files": w2}`` giving each source's expected share of the
  training samples (drawn with replacement each epoch); validation uses both sources in full.

Everything is tokenised once in :meth:`setup` and cached in memory as int32 arrays (a 64K-token example costs
256 KiB, not the ~2 MiB of a Python int list). Synthetic prompts are never truncated: an example longer than
``max_tokens`` is a configuration error. SFT prompts lose tokens from the middle of their context instead.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from flux.data.haystack import HAYSTACK_KINDS
from flux.data.prompting import Prompt, PromptInput, PromptTooLongError, build_prompts, collate_left_padded
from flux.data.sft import SFTRecord, read_sft_records, record_input
from flux.data.synthetic import TASK_TYPES, TASKS, Example, check_lengths, make_mixture, resolve_task_options
from flux.errors import ConfigError, UserFileNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SOURCES = ("synthetic", "jsonl", "parquet", "mixture")
MIXTURE_PARTS = ("synthetic", "files")


class PromptDataset(Dataset):
    """A list of tokenised prompts, stored compactly."""

    def __init__(self, prompts: Sequence[Prompt]) -> None:
        self.prompts = [dataclasses.replace(p, input_ids=np.asarray(p.input_ids, dtype=np.int32)) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]


def example_input(example: Example, with_answer: bool = True, system: str | None = None) -> PromptInput:
    """A synthetic example's prompt texts; the training target lists every reference answer, comma-separated."""
    return PromptInput(
        context=example.context,
        question=example.question,
        answer=", ".join(example.answers) if with_answer else None,
        system=system,
        task=example.task,
        id=example.id,
        answers=tuple(example.answers),
        meta={"length": example.length},
    )


class FluxDataModule(L.LightningDataModule):
    """Training / validation batches for router training; see the module docstring for the sources.

    Synthetic settings (``synthetic`` and ``mixture``): ``tasks``, ``n_train`` / ``n_val`` per task and length,
    ``length_tokens``, ``train_seed`` / ``val_seed``, ``haystack`` ("noise" or "text"), ``task_options`` (per-task
    option overrides) and ``system`` (system message of synthetic prompts; None keeps the template's default).
    File settings (``jsonl``, ``parquet``, ``mixture``): ``train_files``, ``val_files`` (or held-out records, picked
    with ``val_seed``: the share ``val_fraction`` of them, at least one, so a small file works as well as a large
    one; or ``n_val`` of them when ``val_fraction`` is None), ``default_task_type`` for records without one; records
    bring their own
    system message. ``weights`` only for ``mixture``. ``max_tokens`` caps every prompt (see the module docstring).

    ``task_names`` (ordered; ``task_ids`` in batches index it) and ``task_types`` (task -> "retrieval"/"holistic")
    are available before :meth:`setup`, for per-task metrics and per-task sparsity targets. Every setting is checked
    here, before any data is generated or read.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: str = "synthetic",
        tasks: Sequence[str] = tuple(TASKS),
        n_train: int = 16,
        n_val: int = 4,
        length_tokens: int | Sequence[int] = 1024,
        train_seed: int = 1000,
        val_seed: int = 1001,
        haystack: str = "noise",
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        train_files: Sequence[str] = (),
        val_files: Sequence[str] = (),
        val_fraction: float | None = None,
        default_task_type: str = "holistic",
        weights: Mapping[str, float] | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        max_tokens: int | None = None,
        num_workers: int = 0,
        system: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size or 1)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if max_tokens is not None and max_tokens <= 0:
            raise ConfigError(f"max_tokens must be positive or null, got {max_tokens}")
        if default_task_type not in TASK_TYPES:
            raise ConfigError(f"default_task_type {default_task_type!r} is not one of {list(TASK_TYPES)}")
        self.tokenizer = tokenizer
        self.source = source
        self.uses_synthetic = source in ("synthetic", "mixture")
        self.uses_files = source != "synthetic"
        self.tasks = list(tasks) if self.uses_synthetic else []
        self.task_options = {k: dict(v) for k, v in (task_options or {}).items()}
        self.length_tokens = length_tokens if isinstance(length_tokens, int) else list(length_tokens)
        self.n_train, self.n_val = n_train, n_val
        self.train_seed, self.val_seed = train_seed, val_seed
        self.haystack = haystack
        if self.uses_synthetic:
            self._check_synthetic()
        self.train_files = [str(p) for p in train_files]
        self.val_files = [str(p) for p in val_files]
        self.val_fraction = val_fraction
        if self.uses_files:
            self._check_files()
        self.default_task_type = default_task_type
        self.weights = self._check_weights(weights)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_tokens = max_tokens
        self.num_workers = num_workers
        self.system = system
        self.pad_id = self._pad_id(tokenizer)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._train_parts: list[PromptDataset] = []
        self._file_records: tuple[list[SFTRecord], list[SFTRecord]] | None = None

    def _check_synthetic(self) -> None:
        resolve_task_options(self.tasks, self.task_options)
        check_lengths(self.length_tokens)
        if self.n_train < 1 or self.n_val < 1:
            raise ConfigError(f"n_train and n_val must be >= 1 for synthetic data, got {self.n_train}, {self.n_val}")
        if self.train_seed == self.val_seed:
            raise ConfigError(f"train_seed and val_seed are both {self.train_seed}; the splits would be identical")
        if self.haystack not in HAYSTACK_KINDS:
            raise ConfigError(f"unknown haystack {self.haystack!r}; choose one of {list(HAYSTACK_KINDS)}")

    def _check_files(self) -> None:
        if not self.train_files:
            raise ConfigError(f"source={self.source!r} needs train_files (JSONL or Parquet SFT files)")
        for path in self.train_files + self.val_files:
            if not Path(path).is_file():
                raise UserFileNotFoundError(f"data file {path!r} does not exist; fix data.train_files / data.val_files")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must lie in (0, 1): the share of the training "
                             "records held out for validation (or null to hold out n_val records)")
        if not self.val_files and self.val_fraction is None and self.n_val < 1:
            raise ConfigError("without val_files, n_val records are held out for validation; set n_val >= 1")

    def _check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        if self.source != "mixture":
            if weights:
                raise ConfigError(f"weights only apply to source='mixture', not {self.source!r}; remove them")
            return {}
        resolved = {part: 1.0 for part in MIXTURE_PARTS} | dict(weights or {})
        unknown = sorted(set(resolved) - set(MIXTURE_PARTS))
        if unknown:
            raise ConfigError(f"unknown mixture weight key(s) {unknown}; use {list(MIXTURE_PARTS)}")
        if any(w <= 0 for w in resolved.values()):
            raise ConfigError(f"mixture weights must be positive, got {resolved}")
        return resolved

    @staticmethod
    def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        return int(pad)

    def _records(self) -> tuple[list[SFTRecord], list[SFTRecord]]:
        """(train, val) SFT records, read once; held-out validation records are a seeded sample."""
        if self._file_records is None:
            train = read_sft_records(self.train_files, self.default_task_type)
            if self.val_files:
                val = read_sft_records(self.val_files, self.default_task_type)
            else:
                if self.val_fraction is None:
                    n_held, setting = self.n_val, f"n_val={self.n_val}"
                else:
                    n_held = max(1, round(self.val_fraction * len(train)))
                    setting = f"val_fraction={self.val_fraction} ({n_held} records)"
                if n_held >= len(train):
                    raise ConfigError(
                        f"{setting} held-out records leave none of the {len(train)} training records; "
                        "give more records, hold out fewer, or give val_files"
                    )
                order = list(range(len(train)))
                random.Random(self.val_seed).shuffle(order)
                held = set(order[:n_held])
                val = [r for i, r in enumerate(train) if i in held]
                train = [r for i, r in enumerate(train) if i not in held]
            self._file_records = (train, val)
        return self._file_records

    @functools.cached_property
    def task_types(self) -> dict[str, str]:
        """Task name -> "retrieval" | "holistic", synthetic tasks first (in config order), then SFT tasks."""
        types = {task: TASKS[task].task_type for task in self.tasks}
        if self.uses_files:
            train, val = self._records()
            for record in sorted(train + val, key=lambda r: r.task):
                known = types.setdefault(record.task, record.task_type)
                if known != record.task_type:
                    raise ConfigError(
                        f"{record.where}: task {record.task!r} has task_type {record.task_type!r}, but it is "
                        f"{known!r} elsewhere (synthetic tasks keep their registered type); rename the task"
                    )
        return types

    @property
    def task_names(self) -> list[str]:
        return list(self.task_types)

    @property
    def task_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.task_names)}

    def _synthetic(self, n: int, seed: int) -> PromptDataset:
        examples = make_mixture(
            self.tasks, n, self.length_tokens, self.tokenizer, seed, self.haystack, options=self.task_options
        )
        prompts = build_prompts(self.tokenizer, [example_input(e, system=self.system) for e in examples])
        for prompt in prompts:
            if self.max_tokens is not None and len(prompt) > self.max_tokens:
                raise ConfigError(
                    f"synthetic example {prompt.id} has {len(prompt)} tokens > data.max_tokens={self.max_tokens}; "
                    "lower data.length_tokens or raise data.max_tokens (synthetic needles must not be truncated away)"
                )
        return PromptDataset(prompts)

    def _files(self, records: list[SFTRecord]) -> PromptDataset:
        try:
            return PromptDataset(build_prompts(self.tokenizer, [record_input(r) for r in records], self.max_tokens))
        except PromptTooLongError as err:  # the prompt builder names its argument; the user sets data.max_tokens
            raise PromptTooLongError(str(err).replace("max_tokens", "data.max_tokens")) from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        _ = self.task_types  # validates task names/types across sources before any tokenisation
        train_parts: list[PromptDataset] = []
        val_parts: list[PromptDataset] = []
        if self.uses_synthetic:
            train_parts.append(self._synthetic(self.n_train, self.train_seed))
            val_parts.append(self._synthetic(self.n_val, self.val_seed))
        if self.uses_files:
            train_records, val_records = self._records()
            train_parts.append(self._files(train_records))
            val_parts.append(self._files(val_records))
        self._train_parts = train_parts
        self.train_dataset = train_parts[0] if len(train_parts) == 1 else ConcatDataset(train_parts)
        self.val_dataset = val_parts[0] if len(val_parts) == 1 else ConcatDataset(val_parts)

    def _collate(self, drop_answer: bool = False) -> functools.partial:
        return functools.partial(
            collate_left_padded, pad_id=self.pad_id, task_index=self.task_index, drop_answer=drop_answer
        )

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        if self.source != "mixture":
            return self._loader(self.train_dataset, self.batch_size, shuffle=True, collate_fn=self._collate())
        synthetic, files = self._train_parts
        per_sample = [self.weights["synthetic"] / len(synthetic)] * len(synthetic)
        per_sample += [self.weights["files"] / len(files)] * len(files)
        sampler = WeightedRandomSampler(
            per_sample, num_samples=len(per_sample), replacement=True,
            generator=torch.Generator().manual_seed(self.train_seed),
        )  # fmt: skip
        return self._loader(self.train_dataset, self.batch_size, sampler=sampler, collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            raise RuntimeError("call setup() before val_dataloader()")
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False, collate_fn=self._collate())

    def generation_dataloader(self) -> DataLoader:
        """Validation prompts cut before their answers (with ``answers`` kept), for generate-and-score metrics."""
        if self.val_dataset is None:
            raise RuntimeError("call setup() before generation_dataloader()")
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False, collate_fn=self._collate(True))
