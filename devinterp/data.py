"""Data for training: a fresh stream of sampled batches per member, and a fixed probe set.

Member k reads the stream seeded with ``seed + k`` (or ``seed`` for all when ``share_data``),
so an n-member run's member k sees exactly what a 1-member run with seed ``seed + k`` sees.
The batch of step s is a pure function of (stream seed, s): streams are sampled in blocks of
``steps_per_block`` steps (block b from ``[seed_k, b]``), which amortises the per-position cost
of the sampler and lets a resumed run continue the stream at any step. DataLoader workers each
sample whole blocks (worker w of n: every n-th block), so the stream is the same for any number
of workers.
"""

from __future__ import annotations

from devinterp.threads import available_cores

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from devinterp.errors import UsageError, at_least
from devinterp.language import Language, SpecError, load_language, plogp
from devinterp.language.corpus import Corpus, is_corpus_path, load_corpus
from devinterp.language.reachability import emptied_by_knock_out, empty_text, reachability

SAMPLERS = ("numpy", "device")


@dataclass
class ProbeSet:
    """Fixed sequences shared by all members, with what is known of their next tokens.

    From a language: the exact next-token distributions. From a corpus: none; ``true_plogp`` is
    the corpus's log p of the token that came next (NaN without logp), whose mean estimates the
    same expectation, and ``true_top`` is that token.
    """

    tokens: torch.Tensor  # (n_probe, T) int64
    labels: torch.Tensor  # (n_probe, T) int64, entry t labels token t
    rules: torch.Tensor  # (n_probe, T) int64
    true_next: torch.Tensor | None  # (n_probe, T - 1, V) float32: p(token t + 1 | tokens <= t)
    true_plogp: torch.Tensor  # (n_probe, T - 1): sum_v p log p, the negative exact entropy
    true_top: torch.Tensor  # (n_probe, T - 1) int64: the Bayes-optimal guess

    @property
    def has_excess(self) -> bool:
        """Whether excess loss can be measured (exact distributions, or a corpus's logp)."""
        return bool(torch.isfinite(self.true_plogp).any())

    def to(self, device: torch.device | str) -> "ProbeSet":
        """The same set on ``device`` (itself when it is there already)."""
        if self.tokens.device == torch.device(device):
            return self
        return ProbeSet(
            *(
                None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            )
        )


class MemberStreams(IterableDataset):
    """Yields {tokens, labels} of shape (member, batch, pos) for steps start_step, start_step+1, ...

    With a curriculum (``first_language`` for the first ``first_steps`` steps), the block that
    holds the switch is sampled from both languages and each step takes its own.
    """

    def __init__(
        self,
        language: Language,
        seq_len: int,
        batch_size: int,
        stream_seeds: list[int],
        steps_per_block: int,
        start_step: int = 0,
        first_language: Language | None = None,
        first_steps: int = 0,
        shard: tuple[int, int] = (0, 1),
        device: torch.device | None = None,
    ):
        self.language = language
        self.device = device  # None: the numpy sampler; a device: the device sampler there
        self.first_language = first_language
        self.first_steps = first_steps if first_language is not None else 0
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.stream_seeds = stream_seeds
        self.steps_per_block = steps_per_block
        self.start_step = start_step
        self.shard = shard  # (rank, world size): this process's slice of each step's batch

    def block(self, block_index: int, language: Language | None = None):
        """(member, steps_per_block * batch, pos) tokens and labels of one block: numpy arrays,
        or with the device sampler tensors on its device."""
        language = language or self.language
        n = self.steps_per_block * self.batch_size
        distinct = list(dict.fromkeys(self.stream_seeds))  # shared data: sample each stream once
        samples = language.stream_block(n, self.seq_len, distinct, block_index, self.device)
        by_seed = dict(zip(distinct, samples))
        stack = np.stack if self.device is None else torch.stack
        return (
            stack([by_seed[seed].tokens for seed in self.stream_seeds]),
            stack([by_seed[seed].labels for seed in self.stream_seeds]),
        )

    def _block_for_steps(self, block_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        first = block_index * self.steps_per_block
        sources = {}
        for i in range(self.steps_per_block):
            language = self.first_language if first + i < self.first_steps else self.language
            if id(language) not in sources:
                tokens, labels = self.block(block_index, language)
                # label ids in the full language's numbering, whichever language sampled them
                tokens, labels = torch.as_tensor(tokens), torch.as_tensor(labels)
                to_full = torch.tensor(
                    [self.language.label_names.index(n) for n in language.label_names], device=labels.device
                )
                sources[id(language)] = (tokens, to_full[labels])
        out = []
        for i in range(self.steps_per_block):
            language = self.first_language if first + i < self.first_steps else self.language
            tokens, labels = sources[id(language)]
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            out.append((tokens[:, rows], labels[:, rows]))
        return out

    def blocks(self):
        """This process's blocks, each a list of its steps' batches (the first block from the
        start step's offset on): every block from the start step's, or, in a DataLoader worker
        w of n, the blocks first + w, first + w + n, ... The DataLoader collects its workers'
        items in turn (w = 0, 1, ..., n - 1, 0, ...), so the blocks come in order and the
        steps, flattened, are the same stream for any number of workers."""
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        first, offset = divmod(self.start_step, self.steps_per_block)
        rank, world = self.shard
        local = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        block_index = first + worker
        while True:
            steps = self._block_for_steps(block_index)[offset if block_index == first else 0 :]
            yield [{"tokens": tokens[:, local], "labels": labels[:, local]} for tokens, labels in steps]
            block_index += n_workers

    def __iter__(self):
        for block in self.blocks():
            yield from block


class MemberBlocks(IterableDataset):
    """The blocks of a MemberStreams, one item each: what DataLoader workers sample."""

    def __init__(self, streams: MemberStreams):
        self.streams = streams

    def __iter__(self):
        return self.streams.blocks()


class Steps:
    """The steps of a DataLoader over MemberBlocks, flattened in the training process."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self):
        for block in self.loader:
            yield from block


def one_thread(worker_id: int) -> None:
    """A data worker computes with one thread (PyTorch's DataLoader guidance): n workers then
    use n cores, not n times the machine's."""
    torch.set_num_threads(1)


def stream_loader(streams: MemberStreams, workers: int, pin_memory: bool = False):
    """The steps of ``streams`` as training iterates them: in this process (``workers`` 0), or
    sampled by that many persistent DataLoader workers, whole blocks each (MemberBlocks),
    flattened to steps here (Steps). The same stream either way."""
    if workers == 0:
        return DataLoader(streams, batch_size=None, num_workers=0)
    loader = DataLoader(
        MemberBlocks(streams),
        batch_size=None,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=2,
        pin_memory=pin_memory,
        worker_init_fn=one_thread,
    )
    return Steps(loader)


def gpu_workers() -> int:
    """Workers for a GPU run: the cores this process may use, shared among the node's processes
    (torchrun's LOCAL_WORLD_SIZE), less one for training, at most 16."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, available_cores() // local - 1))


class ToyLanguageData(L.LightningDataModule):
    """Batches from a language spec (or a corpus made elsewhere) for an ensemble of members,
    plus a shared probe set.

    Args:
        language: path of the language spec (YAML), or of a corpus made elsewhere (.npz, .h5,
            .hdf5; see devinterp/language/corpus.py): its held-out sequences are the probe set.
        seq_len: tokens per sequence (the model predicts seq_len - 1 of them).
        batch_size: sequences per member per step (the global batch under DDP).
        n_members: ensemble size (linked from the model's option by the CLI).
        seed: member k's stream uses seed + k (linked from the model's option by the CLI).
        share_data: every member reads the stream of ``seed`` (only initialisation differs).
        probe_size: sequences in the fixed probe set shared by all members (a corpus holds them out).
        probe_seed: seed of the probe set (kept apart from training streams; a corpus's choice).
        probe_min_positions: grow the probe set (doubling, up to 16 x probe_size sequences)
            until every primitive has at least this many predicted positions in it (0 = off).
        steps_per_block: steps sampled at once per member.
        knockout: primitives removed from the language (their positions fall back to the next
            rule down); the probe set and metrics follow the knocked-out language.
        knockin: a curriculum: train on these primitives alone (with the category fallback)
            for ``knockin_steps`` steps, then on the full language; probes use the full language.
        num_workers: DataLoader worker processes sampling blocks ahead of training (persistent,
            one thread each; pinned memory on a GPU). ``auto``: on a GPU one per core this
            process may use (its affinity) but one, shared among the node's processes, at most
            16; on a CPU none, where workers would only take cores from training. The stream is
            the same for any number.
        sampler: ``numpy`` (the canonical stream, sampled on the host) or ``device`` (sampled
            in torch on the training device, in the training process: on a GPU the data then
            keeps up with many members where host workers cannot). The device stream is another
            stream of the same language (torch's generator, not numpy's), recorded in the
            timeline (``meta/stream_kind``) so a run resumes only on the same kind of device.
    """

    def __init__(
        self,
        language: str = "configs/languages/seed.yaml",
        seq_len: int = 64,
        batch_size: int = 32,
        n_members: int = 1,
        seed: int = 0,
        share_data: bool = False,
        probe_size: int = 256,
        probe_seed: int = 2**31 - 1,
        probe_min_positions: int = 0,
        steps_per_block: int = 16,
        knockout: list[str] | None = None,
        knockin: list[str] | None = None,
        knockin_steps: int = 0,
        num_workers: int | str = "auto",
        sampler: str = "numpy",
    ):
        super().__init__()
        self.save_hyperparameters()
        if sampler not in SAMPLERS:
            raise UsageError(f"data.sampler: one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if sampler == "device" and num_workers not in ("auto", 0):
            raise UsageError(
                f"data.num_workers: the device sampler samples in the training process; set 0 or auto, "
                f"got {num_workers!r}"
            )
        if sampler == "device" and is_corpus_path(language):
            raise UsageError(
                f"data.sampler: device samples a language spec; {language} is a corpus, read as is"
            )
        self.sampler = sampler
        if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)):
            raise UsageError(f"data.num_workers: a number of workers or auto, got {num_workers!r}")
        if num_workers != "auto":
            at_least(num_workers, 0, "data.num_workers")
        self.num_workers = num_workers
        for field, value in (
            ("batch_size", batch_size),
            ("n_members", n_members),
            ("probe_size", probe_size),
            ("steps_per_block", steps_per_block),
        ):
            at_least(value, 1, f"data.{field}")
        at_least(knockin_steps, 0, "data.knockin_steps")
        self.language_path = str(language)
        self.language: Language | Corpus
        if is_corpus_path(language):
            self.language = load_corpus(Path(language))
            self.language.split(probe_size, probe_seed)
        else:
            self.language = load_language(Path(language))
        self.language.check_sequence_length(seq_len)
        full = self.language
        if knockout:
            self.language = self.language.knock_out(list(knockout))
        # primitives that can never fire, said before training
        lines = emptied_by_knock_out(full, self.language, list(knockout)) if knockout else []
        for line in [f"data.knockout: {line}" for line in lines] or empty_text(self.language):
            print(f"notice: {line}", file=sys.stderr, flush=True)
        self.first_language = self.language.only(list(knockin)) if knockin else None
        if knockin and knockin_steps < 1:
            raise SpecError(f"data.knockin_steps: a knock-in needs at least 1 step, got {knockin_steps}")
        self.knockin_steps = knockin_steps
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.n_members = n_members
        self.seed = seed
        self.share_data = share_data
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        at_least(probe_min_positions, 0, "data.probe_min_positions")
        self.probe_min_positions = probe_min_positions
        self.steps_per_block = steps_per_block
        self._probe: ProbeSet | None = None

    @property
    def d_vocab(self) -> int:
        return self.language.d_vocab

    @property
    def label_names(self) -> list[str]:
        return self.language.label_names

    @property
    def stream_seeds(self) -> list[int]:
        return [self.seed if self.share_data else self.seed + k for k in range(self.n_members)]

    @property
    def spec_text(self) -> str:
        """The language spec as written, or a corpus's description (kept in the timeline)."""
        if isinstance(self.language, Corpus):
            return self.language.describe()
        return Path(self.language_path).read_text()

    def setup(self, stage: str) -> None:
        if isinstance(self.language, Corpus) and (self.trainer is None or self.trainer.is_global_zero):
            print(f"notice: {self.language.notice()}", file=sys.stderr, flush=True)

    def _probe_sample(self):
        """``probe_size`` sequences, doubled (up to 16 times as many) until every primitive that
        can fire has at least ``probe_min_positions`` predicted positions in them; one that
        cannot (devinterp/language/reachability.py) is never looked for."""
        n, cap = self.probe_size, 16 * self.probe_size
        empty = reachability(self.language).empty
        possible = np.array([name not in empty for name in self.label_names[1:]])
        while True:
            sample = self.language.sample(n, self.seq_len, seed=self.probe_seed)
            counts = np.bincount(sample.labels[:, 1:].ravel(), minlength=len(self.label_names))[1:]
            if (counts[possible] >= self.probe_min_positions).all() or n >= cap:
                break
            n = min(2 * n, cap)
        short = [
            f"{name} ({c})"
            for name, c, ok in zip(self.label_names[1:], counts, possible)
            if ok and c < self.probe_min_positions
        ]
        if short and (self.trainer is None or self.trainer.is_global_zero):
            print(
                f"notice: data.probe_min_positions: {', '.join(short)} probe positions in {n} sequences, "
                f"fewer than {self.probe_min_positions}",
                file=sys.stderr,
                flush=True,
            )
        return sample

    @property
    def probe(self) -> ProbeSet:
        if self._probe is None and isinstance(self.language, Corpus):
            sample = self.language.held_out(self.seq_len)
            self._probe = ProbeSet(
                tokens=torch.from_numpy(sample.tokens),
                labels=torch.from_numpy(sample.labels),
                rules=torch.from_numpy(sample.rules),
                true_next=None,
                true_plogp=torch.from_numpy(sample.logp[:, 1:]).float(),
                true_top=torch.from_numpy(sample.tokens[:, 1:]),
            )
        if self._probe is None:
            sample = self._probe_sample()
            true_next = self.language.true_next_dist(sample.tokens)[:, :-1]
            self._probe = ProbeSet(
                tokens=torch.from_numpy(sample.tokens),
                labels=torch.from_numpy(sample.labels),
                rules=torch.from_numpy(sample.rules),
                true_next=torch.from_numpy(true_next).float(),
                true_plogp=torch.from_numpy(plogp(true_next)).float(),
                true_top=torch.from_numpy(true_next.argmax(-1)),
            )
        return self._probe

    def train_dataloader(self) -> DataLoader:
        """Under DDP ``batch_size`` is the global batch: every process samples it (the same
        stream) and trains on its own slice, so n processes train exactly what one would."""
        start = self.trainer.global_step if self.trainer is not None else 0
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        if self.batch_size % world:
            raise UsageError(
                f"data.batch_size: {self.batch_size} sequences do not split evenly over {world} "
                "processes (it is the global batch under DDP)"
            )
        streams = MemberStreams(
            self.language,
            self.seq_len,
            self.batch_size,
            self.stream_seeds,
            self.steps_per_block,
            start_step=start,
            first_language=self.first_language,
            first_steps=self.knockin_steps,
            shard=(rank, world),
            device=self.sampler_device(),
        )
        return stream_loader(streams, self.workers(), pin_memory=self._on_gpu() and self.sampler == "numpy")

    def sampler_device(self) -> torch.device | None:
        """Where the training stream is sampled: None for numpy, else the training device."""
        if self.sampler == "numpy":
            return None
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    @property
    def stream_kind(self) -> str:
        """Which stream training reads: ``numpy``, or ``torch-<device type>`` for the device
        sampler (another generator per kind of device)."""
        device = self.sampler_device()
        return "numpy" if device is None else f"torch-{device.type}"

    def _on_gpu(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def workers(self) -> int:
        """``num_workers`` resolved: ``auto`` is 0 on a CPU, and on a GPU the cores this
        process may use, shared among the node's processes, less one for training (at most 16)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        return gpu_workers() if self._on_gpu() and self.sampler == "numpy" else 0

    def val_dataloader(self) -> DataLoader:
        probe = self.probe
        batches = [
            {
                "tokens": probe.tokens[i : i + self.batch_size].expand(self.n_members, -1, -1),
                "labels": probe.labels[i : i + self.batch_size].expand(self.n_members, -1, -1),
                "true_plogp": probe.true_plogp[i : i + self.batch_size],
            }
            | ({} if probe.true_next is None else {"true_next": probe.true_next[i : i + self.batch_size]})
            for i in range(0, len(probe.tokens), self.batch_size)
        ]
        return DataLoader(batches, batch_size=None)
