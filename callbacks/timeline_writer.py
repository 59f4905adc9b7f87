"""TimelineWriter: every metric row of a run in one HDF5 file (docs/guides/training.md, "Reading the
timeline"; the layout is in devinterp/store/schema.py, the design in docs/architecture.md).

One-way data flow. A producer (CircuitMetrics, ProbeMetrics, or any callback that writes a
group) declares its groups in its ``setup`` (``declare(TimelineGroup(...))``) and hands every
row to the writer as it is made (``append(group, step, values)``, values on the model's device).
The writer alone keeps rows on the device; every ``flush_every_n_steps`` steps, and when
training ends or fails, it moves every pending row and weight snapshot to the host in one
transfer, writes them, flushes the file, and only then hands one dict per step to
``trainer.loggers`` (each group's ``summarize`` makes them from the host rows). A training step
makes no host synchronisation. Producers are listed before the writer (checked in ``setup``), so
at a step's end the writer holds every row of that step; a step reaches the loggers once, when
all its rows have (a probe row evaluated after the last update of a block waits for the next).

A killed run keeps every row up to its last commit, and a checkpoint commits first. The file is
built as ``timeline.h5.partial``, switched to SWMR mode with its structure flushed, and only
then renamed to the timeline (before the first step), so a kill at any moment leaves either no
timeline or one that opens with zero or more committed rows, and another process can read it
while it is written (``h5py.File(path, "r", swmr=True, libver="latest")``;
analysis.load_timeline does this). A killed writer leaves the file marked open for writing: a
plain ``h5py.File(path, "r")`` or h5ls refuses it until ``h5clear -s path`` (hdf5-tools);
load_timeline and a resume read it as it is and never alter it. Non-finite values are caught
when a block reaches the host: the rows are written and committed, then the run stops with the
first bad step and metric named. Only global rank zero writes.

Resume: a run restored from a checkpoint at step r copies the old file's committed rows before
r into a fresh file, checked against the metrics this run declares, and replaces the old file
only once the copy is complete and in SWMR mode (a killed SWMR writer leaves flags that forbid
reopening the file for writing; a copy needs none of that). Rows from r on are computed again.

Loggers: ``meta/logged_through`` (the last step handed to them) is flushed before the hand-over.
A resumed run skips every step at or below the old file's ``logged_through``, so no step reaches
W&B twice across the segments of a run. W&B's own writer loses what it had not put on disk when
its process is killed; a resume reads the earlier segments' W&B files and sends those lost rows
again from the timeline (through the same ``summarize``), so the segments together hold every
step once. A finished run whose writer was killed while finishing is not trained again: its
resume sends only those lost rows, from the file as it is.
"""

from __future__ import annotations

from devinterp.threads import in_force

import json
import os
import resource
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import h5py
import lightning as L
import numpy as np
import torch
import yaml

import devinterp
from callbacks.thread_tuning import ThreadTuning
from devinterp.errors import UsageError, at_least
from devinterp.language.reachability import reachability
from devinterp.model import PARAMETER_AXES
from devinterp.store.schema import GROUP_MARKER, INFO_FIELDS, SCHEMA_VERSION, VALUES_AXES, MetricInfo
from devinterp.store.timeline import TimelineError, open_timeline
from devinterp.store.wandb_files import WandbReadError, last_logged_step

STRING = h5py.string_dtype()
PROGRESS_BAR_METRIC = "train/loss"  # the progress bar shows its last flushed value
LoggerRows = Callable[[np.ndarray, np.ndarray], list[dict[str, float]]]


class NonFiniteMetricError(RuntimeError):
    """A metric became NaN or infinite: the run diverged."""


class TimelineWriteError(RuntimeError):
    """The timeline cannot be written or resumed; the message names the file and the reason."""


@dataclass
class TimelineGroup:
    """One group of the timeline, declared by the producer that writes it.

    name: the HDF5 group (and how ``analysis.Timeline.groups`` names it).
    infos: one per metric, in the order of a row's first axis.
    n_members: a row's second axis.
    every_n_steps: about how often a row comes (sizes the file for the disk-space check);
        ``due`` (step -> bool), where given, says exactly which steps have one.
    summarize: host rows (steps (n,), values (n, n_metrics, member)) -> one logger dict per
        row; None sends nothing to the loggers.
    """

    name: str
    infos: list[MetricInfo]
    n_members: int
    every_n_steps: int = 1
    due: Callable[[int], bool] | None = None
    summarize: LoggerRows | None = None


@runtime_checkable
class TimelineProducer(Protocol):
    """A callback that appends rows to timeline groups: ``timeline_groups`` names them. The
    writer checks in ``setup`` that every producer comes before it in ``trainer.callbacks``."""

    timeline_groups: tuple[str, ...]


def find_writer(trainer: L.Trainer) -> "TimelineWriter":
    """The run's TimelineWriter; a producer without one is a configuration error."""
    writer = next((c for c in trainer.callbacks if isinstance(c, TimelineWriter)), None)
    if writer is None:
        raise UsageError("trainer.callbacks: the metric callbacks need a TimelineWriter callback after them")
    return writer


def _strings(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


class TimelineWriter(L.Callback):
    """Write metric rows to ``<run folder>/<filename>``.

    Args:
        filename: file name inside the trainer's ``default_root_dir``.
        flush_every_n_steps: commit cadence: rows move to the host, the file and the loggers
            this often (one setting for the whole run).
        n_snapshots: weight snapshots at this many log-spaced steps (0 = none); the last
            snapshot holds the final weights.
    """

    def __init__(
        self,
        filename: str = "timeline.h5",
        flush_every_n_steps: int = 100,
        n_snapshots: int = 16,
    ):
        at_least(flush_every_n_steps, 1, "timeline.flush_every_n_steps")
        at_least(n_snapshots, 0, "timeline.n_snapshots")
        self.filename = filename
        self.flush_every_n_steps = flush_every_n_steps
        self.n_snapshots = n_snapshots
        self.run_config: str | None = None  # the resolved CLI config (YAML), set by the CLI
        self.resuming = False  # set by the CLI's resume: an existing file is this run's, resumed
        self.replay_after: int | None = None  # set by the CLI: a finished run, W&B lacks later steps
        self.groups: dict[str, TimelineGroup] = {}
        self.file: h5py.File | None = None
        self.path: Path | None = None
        self.snapshot_steps: np.ndarray = np.zeros(0, dtype=np.int64)
        self._pending_rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._pending_snapshots: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self._pending_logs: dict[int, dict[str, float]] = defaultdict(dict)
        self._trainer = self._module = None
        self._logged_through = -1  # last step handed to the loggers, this segment or earlier ones
        self._logged_before = -1  # last step an earlier segment of this run handed to them
        self._no_batch_step = -1  # the final weights' step: its training losses have no batch
        self._flushed_loss: tuple[int, float] | None = None  # (step, train/loss) last handed over

    # ---- producers -----------------------------------------------------------------------

    def declare(self, group: TimelineGroup) -> None:
        """Register a group before training starts (from a producer's ``setup``)."""
        names = [i.name for i in group.infos]
        if len(set(names)) != len(names):
            raise ValueError(f"timeline group {group.name!r}: duplicate metric names")
        if group.name in ("meta", "ground_truth", "snapshots"):
            raise ValueError(f"timeline group {group.name!r}: the name is reserved")
        self.groups[group.name] = group
        self._pending_rows[group.name] = []

    def append(self, group: str, step: int, values: torch.Tensor) -> None:
        """Keep one row, values (n_metrics, member) on the model's device, until the next commit."""
        declared = self.groups.get(group)
        if declared is None:
            raise KeyError(f"timeline group {group!r} was not declared")
        if tuple(values.shape) != (len(declared.infos), declared.n_members):
            raise ValueError(
                f"timeline group {group!r}: a row of shape {tuple(values.shape)}, declared "
                f"({len(declared.infos)}, {declared.n_members})"
            )
        self._pending_rows[group].append((step, values.detach()))

    def commit(self, complete_through: int | None = None) -> None:
        """Move every pending row and snapshot to the host in one transfer, write them, mark
        them committed and flush the file; then hand the loggers one dict per step, in step
        order, for the steps up to ``complete_through`` (None: all; steps an earlier segment
        sent are skipped). Raises NonFiniteMetricError, after committing, if a dense value
        is NaN or infinite."""
        self._open()
        rows = {name: pending for name, pending in self._pending_rows.items() if pending}
        snapshots = self._pending_snapshots
        self._pending_rows = {name: [] for name in self._pending_rows}
        self._pending_snapshots = []
        if self.file is None:  # not rank zero (or not training): the rows are dropped all the same
            return
        host = self._to_host(
            [v for pending in rows.values() for _, v in pending]
            + [w for _, _, weights in snapshots for w in weights.values()]
        )
        blocks = {}
        for name, pending in rows.items():
            blocks[name] = (np.array([s for s, _ in pending], dtype=np.int64), np.stack(host[: len(pending)]))
            host = host[len(pending) :]
        try:
            for name, (steps, values) in blocks.items():
                self._write_rows(name, steps, values)
            for slot, step, weights in snapshots:
                self._write_snapshot(slot, step, dict(zip(weights, host[: len(weights)])))
                host = host[len(weights) :]
            for name in self.groups:
                self.file[name]["committed"][0] = self.file[name]["step"].shape[0]
            for name, (steps, values) in blocks.items():
                self._queue_logs(name, steps, values)
            ready = sorted(s for s in self._pending_logs if complete_through is None or s <= complete_through)
            if ready:
                self._logged_through = max(self._logged_through, ready[-1])
                self.file["meta/logged_through"][0] = self._logged_through
            self.file.flush()
        except OSError as error:
            raise TimelineWriteError(
                f"{self.path}: cannot write the timeline ({error}); rows committed before are kept"
            ) from None
        for step in ready:
            metrics = self._pending_logs.pop(step)
            if PROGRESS_BAR_METRIC in metrics:
                self._flushed_loss = (step, metrics[PROGRESS_BAR_METRIC])
            for logger in self._trainer.loggers if self._trainer is not None else ():
                logger.log_metrics(metrics, step=step)
        for name, (steps, values) in blocks.items():
            self._check_finite(name, steps, values)

    @staticmethod
    def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """One device-to-host transfer for many tensors (float32)."""
        if not tensors:
            return []
        flat = torch.cat([t.float().flatten() for t in tensors]).cpu().numpy()
        sizes = np.cumsum([t.numel() for t in tensors])[:-1]
        return [part.reshape(t.shape) for part, t in zip(np.split(flat, sizes), tensors)]

    def _write_rows(self, name: str, steps: np.ndarray, values: np.ndarray) -> None:
        g = self.file[name]
        n_old = g["step"].shape[0]
        n_new = n_old + len(steps)
        g["step"].resize((n_new,))
        g["values"].resize((n_new, *g["values"].shape[1:]))
        g["step"][n_old:] = steps
        g["values"][n_old:] = values

    def _queue_logs(self, name: str, steps: np.ndarray, values: np.ndarray) -> None:
        summarize = self.groups[name].summarize
        if summarize is None:
            return
        for step, metrics in zip(steps.tolist(), summarize(steps, values)):
            if step > self._logged_before:
                self._pending_logs[step].update(metrics)

    def _check_finite(self, name: str, steps: np.ndarray, values: np.ndarray) -> None:
        """Sparse metrics may be NaN, except the total training loss, which every step with a
        batch has (all its primitives' losses are NaN only at the final weights' step)."""
        infos = self.groups[name].infos
        total_loss = np.array([i.kind == "train" and i.primitive == "all" for i in infos])
        dense = ~np.array([i.sparse for i in infos], dtype=bool)
        dense = dense[None, :] | (total_loss[None, :] & (steps != self._no_batch_step)[:, None])
        bad = ~np.isfinite(values) & dense[:, :, None]
        if bad.any():
            row, metric, member = np.argwhere(bad)[0]
            raise NonFiniteMetricError(
                f"training diverged: {infos[metric].name} is {values[row, metric, member]} for member "
                f"{member} at step {int(steps[row])}; the timeline {self.path} keeps every row up to it"
            )

    # ---- file set-up ---------------------------------------------------------------------

    def _create(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> h5py.File:
        """A new file with meta, ground truth, empty groups and snapshot slots (not yet SWMR)."""
        f = h5py.File(path, "w", libver="latest")  # SWMR from the start: see _start
        meta = f.create_group("meta")
        meta["schema_version"] = str(SCHEMA_VERSION)
        meta["package_version"] = devinterp.__version__
        meta["config"] = self._config_text(trainer, pl_module)
        meta.create_dataset("logged_through", data=np.full(1, -1, dtype=np.int64))
        language = trainer.datamodule.language
        meta["language_spec"] = trainer.datamodule.spec_text  # a corpus: its description
        meta["stream_kind"] = stream_kind(trainer)
        tuners = [c.tuner for c in trainer.callbacks if isinstance(c, ThreadTuning)]
        meta["compute"] = in_force(tuners[0].candidates if tuners else None)  # threads, wait policy
        # primitives that can never fire in this (possibly knocked-out) language: analyses leave
        # them out with this reason instead of reading their absent metrics as not learned
        meta["empty_primitives"] = json.dumps(reachability(language).empty)
        truth = f.create_group("ground_truth")
        truth["vocab"] = _strings(language.vocab.tokens).astype(STRING)
        truth["categories"] = _strings(language.vocab.categories).astype(STRING)
        truth["token_category"] = language.vocab.token_category
        truth["label_names"] = _strings(language.label_names).astype(STRING)
        truth["rule_names"] = _strings(language.rule_names).astype(STRING)
        for key, array in language.ground_truth().items():
            truth[key] = np.asarray(array)
        for primitive in language.primitives:
            truth[f"{primitive.name}/kind"] = primitive.kind
        for group in self.groups.values():
            self._create_group(f, group)
        self._create_snapshots(f, trainer, pl_module)
        return f

    def _partial(self) -> Path:
        """Where a file is built before it takes the timeline's name (new, or a resume's copy)."""
        return self.path.with_name(self.path.name + ".partial")

    def _start(self, f: h5py.File) -> None:
        """Switch the file built at ``_partial()`` to SWMR writing once every dataset exists,
        flush, and only then give it the timeline's name (a rename of the open file: the handle
        writes on). From here on the file on disk is valid after a kill at any moment (SWMR orders
        its metadata writes so a reader never sees a half-written structure; a plain HDF5 file is
        not crash-consistent while it is written), and another process can read it while it is
        written. A kill before the rename leaves only the partial file, which the next run
        overwrites: a file marked open for writing without SWMR opens in no mode without
        ``h5clear``, so it must never carry the timeline's name (nor replace a resumed run's
        rows)."""
        self.file = f
        f.flush()
        f.swmr_mode = True
        f.flush()
        os.replace(self._partial(), self.path)

    def _config_text(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The run's resolved config (every section, from the CLI) with the model and data
        sections as the classes were built (linked values included); without the CLI, those two."""
        config = (yaml.safe_load(self.run_config) or {}) if self.run_config else {}
        config["model"] = dict(pl_module.hparams)
        config["data"] = dict(trainer.datamodule.hparams)
        return yaml.safe_dump(config, sort_keys=False)

    @staticmethod
    def _create_group(f: h5py.File, group: TimelineGroup) -> None:
        g = f.create_group(group.name)
        g.attrs[GROUP_MARKER] = 1
        n_metrics, M = len(group.infos), group.n_members
        chunk_rows = TimelineWriter.chunk_rows(group)
        g.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk_rows,))
        g["step"].attrs["axes"] = "row"
        g["step"].attrs["unit"] = "optimiser steps"
        g.create_dataset(
            "values",
            shape=(0, n_metrics, M),
            maxshape=(None, n_metrics, M),
            dtype=np.float32,
            chunks=(chunk_rows, n_metrics, M),
        )
        g["values"].attrs["axes"] = VALUES_AXES
        g["names"] = _strings(i.name for i in group.infos).astype(STRING)
        g["names"].attrs["axes"] = "metric"
        info = g.create_group("metric_info")
        info.attrs["axes"] = "metric"
        for field, kind in INFO_FIELDS.items():
            column = [getattr(i, field) for i in group.infos]
            info[field] = (
                _strings(column).astype(STRING)
                if kind == "str"
                else np.array(column, dtype=np.float64 if kind == "float" else bool)
            )
        g.create_dataset("committed", data=np.zeros(1, dtype=np.int64))

    def _create_snapshots(self, f: h5py.File, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot_steps = log_spaced_steps(trainer.max_steps, self.n_snapshots)
        s = f.create_group("snapshots")
        s.create_dataset("step", data=np.full(len(self.snapshot_steps), -1, dtype=np.int64))
        s["step"].attrs["axes"] = "snapshot"
        s["planned_step"] = self.snapshot_steps
        s["planned_step"].attrs["axes"] = "snapshot"
        for name, param in pl_module.model.named_parameters():
            s.create_dataset(name, shape=(len(self.snapshot_steps), *param.shape), dtype=np.float32)
            s[name].attrs["axes"] = "snapshot, " + PARAMETER_AXES[name]

    @staticmethod
    def chunk_rows(group: TimelineGroup) -> int:
        """Rows per chunk of a group's datasets: about 256 KiB of values, 1 to 1024 rows."""
        return max(1, min(1024, 2**18 // max(1, len(group.infos) * group.n_members * 4)))

    def expected_bytes(self, max_steps: int, n_parameters: int) -> int:
        """About how large the finished file will be: every group's rows in whole chunks (a
        group with few rows still takes a chunk), the snapshots, and 1 MiB for meta, ground
        truth and HDF5's own structures."""

        def n_rows(g: TimelineGroup) -> int:
            if g.due is not None:
                rows = sum(map(g.due, range(max_steps + 1))) + 2
            else:
                rows = max_steps // g.every_n_steps + 2
            chunk = self.chunk_rows(g)
            return -(-rows // chunk) * chunk  # HDF5 allocates whole chunks

        rows = sum(n_rows(g) * (len(g.infos) * g.n_members * 4 + 8) for g in self.groups.values())
        snapshots = len(log_spaced_steps(max_steps, self.n_snapshots)) * n_parameters * 4
        return rows + snapshots + 2**20

    def _check_space(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse to start a run whose timeline or checkpoints will not fit: a file-size limit or
        the free space of the run folder's disk (checked before the first step, not hours in)."""
        if trainer.max_steps is None or trainer.max_steps < 0:
            return
        n_parameters = sum(p.numel() for p in pl_module.parameters())
        timeline = self.expected_bytes(trainer.max_steps, n_parameters)
        checkpoint = 3 * 4 * n_parameters + 2**16  # weights and two AdamW moments
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        mib = 2**20
        if limit != resource.RLIM_INFINITY and max(timeline, checkpoint) > limit:
            raise TimelineWriteError(
                f"{self.path}: the timeline needs about {timeline / mib:.1f} MiB for {trainer.max_steps} "
                "steps "
                f"and a checkpoint {checkpoint / mib:.1f} MiB, but the file-size limit (ulimit -f) is "
                f"{limit / mib:.1f} MiB"
            )
        free = shutil.disk_usage(self.path.parent).free
        if timeline + checkpoint > free:
            raise TimelineWriteError(
                f"{self.path}: the timeline needs about {timeline / mib:.1f} MiB for {trainer.max_steps} "
                "steps "
                f"and checkpoints {checkpoint / mib:.1f} MiB, but the disk has {free / mib:.1f} MiB free"
            )

    def _resume(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Copy the old file's committed rows before ``step`` into a fresh file that replaces it."""
        try:
            old = open_timeline(self.path)
        except TimelineError as error:
            raise TimelineWriteError(f"cannot resume: {error}") from None
        with old:
            old_kind = old["meta/stream_kind"][()] if "stream_kind" in old["meta"] else b"numpy"
            old_kind = old_kind.decode() if isinstance(old_kind, bytes) else str(old_kind)
            if old_kind != stream_kind(trainer):
                raise TimelineWriteError(
                    f"{self.path}: cannot resume, the run was trained on the {old_kind} stream and this "
                    f"process would sample the {stream_kind(trainer)} stream (data.sampler, and the kind "
                    "of device, must be those of the run)"
                )
            new = self._create(trainer, pl_module, self._partial())
            try:
                for name, group in self.groups.items():
                    if name not in old:  # a group this version adds: it starts at the resumed step
                        print(
                            f"notice: {self.path}: group {name!r} is new since the run started; its rows "
                            f"begin at step {step}",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    old_names = [
                        v.decode() if isinstance(v, bytes) else str(v) for v in old[name]["names"][()]
                    ]
                    if (
                        old_names != [i.name for i in group.infos]
                        or old[name]["values"].shape[2] != group.n_members
                    ):
                        raise TimelineWriteError(
                            f"{self.path}: cannot resume, group {name!r} was written with other metrics or "
                            "members than this run computes; resume with the run's own config.yaml"
                        )
                    steps = old[name]["step"][: int(old[name]["committed"][0])]
                    keep = int(np.searchsorted(steps, step, side="left"))  # steps are increasing
                    target = new[name]
                    target["step"].resize((keep,))
                    target["values"].resize((keep, *target["values"].shape[1:]))
                    target["step"][:] = steps[:keep]
                    block = max(1, target["values"].chunks[0]) * 16
                    for begin in range(0, keep, block):
                        end = min(keep, begin + block)
                        target["values"][begin:end] = old[name]["values"][begin:end]
                    target["committed"][0] = keep
                self._copy_snapshots(old, new, step)
                if "logged_through" in old["meta"]:
                    self._logged_before = self._logged_through = int(old["meta/logged_through"][0])
                    new["meta/logged_through"][0] = self._logged_through
                new.flush()
            except BaseException:
                new.close()
                raise
        self._start(new)  # the old file stays whole until the copy is complete and SWMR
        self._replay_lost_logs(trainer, step)

    def _replay_lost_logs(self, trainer: L.Trainer, step: int) -> None:
        """Queue again, for the next commit, the rows before ``step`` that earlier W&B segments
        lost when their process was killed (their writer had not yet put them on disk)."""
        try:
            persisted = last_logged_step(Path(trainer.default_root_dir) / "wandb")
        except (WandbReadError, OSError, ValueError, subprocess.SubprocessError):  # trust the hand-over
            persisted = None
        if persisted is None or persisted >= self._logged_before:
            return
        self._queue_lost_logs(self.file, persisted, before=step)

    def _queue_lost_logs(self, f: h5py.File, persisted: int, before: int | None = None) -> None:
        """Queue the committed rows of ``f`` after ``persisted`` (and before ``before``)."""
        self._logged_before = persisted
        for name in self.groups:
            steps = f[name]["step"][: int(f[name]["committed"][0])]
            lost = np.flatnonzero((steps > persisted) & (steps < (np.inf if before is None else before)))
            if len(lost):  # steps increase, so the lost rows are one block
                self._queue_logs(name, steps[lost], f[name]["values"][lost[0] : lost[-1] + 1])

    @staticmethod
    def _copy_snapshots(old: h5py.File, new: h5py.File, step: int) -> None:
        """Snapshots taken before ``step`` at steps the new plan also has."""
        if "snapshots" not in old:
            return
        old_s, new_s = old["snapshots"], new["snapshots"]
        old_steps, planned = old_s["step"][()], list(new_s["planned_step"][()])
        for old_slot, taken in enumerate(old_steps):
            if 0 <= taken < step and taken in planned:
                slot = planned.index(taken)
                for name in new_s:
                    if name not in ("step", "planned_step") and name in old_s:
                        if old_s[name].shape[1:] == new_s[name].shape[1:]:
                            new_s[name][slot] = old_s[name][old_slot]
                new_s["step"][slot] = taken

    # ---- hooks ---------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._module = (trainer, pl_module) if stage == "fit" else (None, None)
        mine = trainer.callbacks.index(self)
        late = [type(c).__name__ for c in trainer.callbacks[mine + 1 :] if isinstance(c, TimelineProducer)]
        if late:
            raise UsageError(
                f"trainer.callbacks: {', '.join(late)} must come before the TimelineWriter, "
                "so that every row of a step is written before the step is committed"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.replay_after is not None and trainer.is_global_zero:
            self._replay_finished(trainer, self.replay_after)

    def _replay_finished(self, trainer: L.Trainer, persisted: int) -> None:
        """A finished run whose W&B writer was killed while finishing: hand the loggers, from the
        file as it is (read only), every step after ``persisted``, one dict per step. Training
        does not run (the restored step is max_steps)."""
        path = Path(trainer.default_root_dir) / self.filename
        try:
            f = open_timeline(path)
        except TimelineError as error:
            raise TimelineWriteError(f"cannot send the lost W&B rows: {error}") from None
        with f:
            self._queue_lost_logs(f, persisted)
        for step in sorted(self._pending_logs):
            metrics = self._pending_logs.pop(step)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open()

    def _open(self) -> None:
        """Create (or, resuming, reopen) the file once training has started and the restored
        step is known; producers may call in first, from their own on_train_start."""
        trainer, pl_module = getattr(self, "_trainer", None), getattr(self, "_module", None)
        if self.file is not None or trainer is None or not trainer.is_global_zero:
            return
        self.path = Path(trainer.default_root_dir) / self.filename
        if self.path.exists() and (trainer.global_step > 0 or self.resuming):
            self._resume(trainer, pl_module, trainer.global_step)
            return
        if self.path.exists():
            raise TimelineWriteError(f"{self.path}: a timeline already exists; a new run needs a new folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write the timeline ({error})") from None
        self._check_space(trainer, pl_module)
        try:
            self._start(self._create(trainer, pl_module, self._partial()))
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write the timeline ({error})") from None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._snapshot(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if last_step_reached(trainer):
            self._finish(trainer, pl_module)
        elif trainer.global_step % self.flush_every_n_steps:
            return
        else:
            self.commit(
                complete_through=trainer.global_step - 1
            )  # later rows (a probe after the update) wait
        if self._flushed_loss is not None:  # host values already: the bar reads no tensor on the device
            step, loss = self._flushed_loss
            pl_module.log_dict(
                {"loss": torch.tensor(loss), "loss_step": torch.tensor(float(step))},
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """A checkpoint never claims a step whose rows are not committed: a resume keeps the
        committed rows before the checkpoint's step and recomputes from it, so whatever the
        flush and checkpoint cadences, nothing falls between them."""
        if trainer.state.fn == "fit" and self.file is not None:
            self.commit(complete_through=trainer.global_step - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)  # a run ended otherwise than by max_steps
        self.commit()

    def _finish(self, trainer, pl_module) -> None:
        """The final weights: their snapshot, and a commit of every row (the producers gave
        the final weights' rows just before), once."""
        if self._no_batch_step == trainer.global_step:
            return
        self._no_batch_step = trainer.global_step  # its training losses have no batch
        self._snapshot(trainer.global_step, pl_module, final=True)
        self.commit()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()
        self._trainer = self._module = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:  # every row handed over so far is committed
            self.close()
        except NonFiniteMetricError:  # already the reason the run stops; close() committed the rows
            pass

    def close(self) -> None:
        if self.file is not None:
            try:
                self.commit()
            finally:
                self.file.close()
                self.file = None

    def _snapshot(self, step: int, pl_module: L.LightningModule, final: bool = False) -> None:
        """Copy the weights at a planned step on their device; they reach the file at the next
        commit, so a snapshot costs no host synchronisation in the step."""
        if self.file is None or not len(self.snapshot_steps):
            return
        slot = len(self.snapshot_steps) - 1 if final else np.flatnonzero(self.snapshot_steps == step)
        if not final and not len(slot):
            return
        slot = int(slot if final else slot[0])
        with torch.no_grad():
            weights = {name: param.detach().clone() for name, param in pl_module.model.named_parameters()}
        self._pending_snapshots.append((slot, step, weights))

    def _write_snapshot(self, slot: int, step: int, weights: dict[str, np.ndarray]) -> None:
        s = self.file["snapshots"]
        for name, value in weights.items():
            s[name][slot] = value
        s["step"][slot] = step

    def state_dict(self) -> dict:
        """Rows per group when the checkpoint was taken; a resume truncates to the restored step."""
        rows = {}
        if self.file is not None:
            rows = {name: int(self.file[name]["step"].shape[0]) for name in self.groups}
        return {"filename": self.filename, "rows": rows}


def last_step_reached(trainer: L.Trainer) -> bool:
    """The last batch of a run bounded by ``max_steps`` has ended. The final weights are measured
    and committed then, in the batch's end hook, before ModelCheckpoint (always the last
    callback) saves that step: a checkpoint at the last step never claims uncommitted rows."""
    return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step


def log_spaced_steps(max_steps: int, n: int) -> np.ndarray:
    """About n distinct steps from 0 to max_steps, log-spaced in step + 1, both ends included."""
    if n <= 0 or max_steps is None or max_steps < 0:
        return np.zeros(0, dtype=np.int64)
    steps = np.round(np.geomspace(1, max_steps + 1, num=n)).astype(np.int64) - 1
    return np.union1d(steps, [0, max_steps])


def stream_kind(trainer: L.Trainer) -> str:
    """The training stream's kind (``numpy``, or ``torch-<device type>`` for the device
    sampler), for a data module that says; ``numpy`` for one that does not."""
    return str(getattr(trainer.datamodule, "stream_kind", "numpy"))
