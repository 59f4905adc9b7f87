"""TimelineWriter: every metric row of a run in one HDF5 file (DESIGN.md, "HDF5 timeline").

Layout (schema version 1):

    meta/            schema_version, package_version, config, language_spec (string datasets;
                     for a corpus made elsewhere its path, sha256, shape and labels);
                     logged_through (1,) int64: the last step handed to the loggers (W&B)
    ground_truth/    vocab, categories, token_category, label_names, rule_names,
                     <primitive>/<array> (tables and rule indices of the language;
                     a corpus: corpus/probe_rows, the held-out sequences)
    <group>/         one per cadence: every_step/, diagnostics/, probe/
        step         (N,) int64, row r holds the metrics at step[r]
        values       (N, n_metrics, n_members) float32, chunked along N, resizable
        names        (n_metrics,) metric names, shared with W&B
        metric_info/ kind, primitive, rule (strings), nothing, learned (float; NaN if not progress),
                     sparse (bool: NaN means no data at that step)
        committed    (1,) int64: rows written and flushed; rows past it may be half-written
    snapshots/       step (n,) int64 (-1 = not yet), <parameter> (n, *shape) float32: weights
                     at log-spaced steps, preallocated

Row 0 is step 0, the initial weights. Rows are buffered by their producers on the model's device
and written here in blocks: ``commit`` asks every producer to ``hand_over`` its buffer, writes
the weight snapshots copied since the last commit, and flushes the file, so a killed run keeps
every row up to its last commit and a training step makes no host synchronisation.
Non-finite values are caught when a block arrives (no per-step host sync): the rows are written
and committed, then the run stops with the first bad step and metric named. Only global rank
zero writes. Live mode opens the file with SWMR so another process can read while it is written
(``h5py.File(path, "r", swmr=True, libver="latest")``; analysis.load_timeline does this).

Resume: a run restored from a checkpoint at step r copies the old file's committed rows before
r into a fresh file, checked against the metrics this run declares, and replaces the old file
only once the copy is complete (a killed SWMR writer leaves flags that forbid reopening the file
for writing; a copy needs none of that). Rows from r on are computed again.

Loggers: producers hand their per-step logger dicts to ``queue_log``; they reach ``trainer.loggers``
only at a commit, after ``meta/logged_through`` was flushed. A resumed run skips every step at
or below the old file's ``logged_through``, so no step reaches W&B twice across the segments of
a run (a kill between the flush and the hand-over can leave a gap in W&B, never a repeat; the
timeline has every row either way). W&B's own writer loses what it had not put on disk when its
process is killed; a resume reads the earlier segments' files and sends those lost rows again
from the timeline (producers' ``replay_logs``), so the segments together hold every step once.
"""

from __future__ import annotations

import os
import resource
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
import yaml

import devinterp
from devinterp.errors import at_least
from devinterp.metrics import MetricInfo
from devinterp.wandb_files import last_logged_step

SCHEMA_VERSION = 1
STRING = h5py.string_dtype()


class NonFiniteMetricError(RuntimeError):
    """A metric became NaN or infinite: the run diverged."""


class TimelineWriteError(RuntimeError):
    """The timeline cannot be written or resumed; the message names the file and the reason."""


def find_writer(trainer: L.Trainer) -> "TimelineWriter | None":
    return next((c for c in trainer.callbacks if isinstance(c, TimelineWriter)), None)


def log_metrics(trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
    """Send one step's logger dict: through the writer (at its next commit) when there is one."""
    writer = find_writer(trainer)
    if writer is not None:
        writer.queue_log(step, metrics)
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


@dataclass
class _Group:
    infos: list[MetricInfo]
    n_members: int
    every_n_steps: int = 1


def _strings(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


class TimelineWriter(L.Callback):
    """Write metric rows to ``<run folder>/<filename>``.

    Args:
        filename: file name inside the trainer's ``default_root_dir``.
        flush_every_n_steps: commit cadence; producers hand over their buffered rows first.
        live: SWMR mode, so another process can read the file while it is written.
        n_snapshots: weight snapshots at this many log-spaced steps (0 = none); the last
            snapshot holds the final weights.
    """

    def __init__(self, filename: str = "timeline.h5", flush_every_n_steps: int = 100, live: bool = False,
                 n_snapshots: int = 16):
        at_least(flush_every_n_steps, 1, "timeline.flush_every_n_steps")
        at_least(n_snapshots, 0, "timeline.n_snapshots")
        self.filename = filename
        self.flush_every_n_steps = flush_every_n_steps
        self.live = live
        self.n_snapshots = n_snapshots
        self.groups: dict[str, _Group] = {}
        self.file: h5py.File | None = None
        self.path: Path | None = None
        self.snapshot_steps: np.ndarray = np.zeros(0, dtype=np.int64)
        self._pending_logs: list[tuple[int, dict[str, float]]] = []
        self._pending_snapshots: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self._trainer = self._module = None
        self._logged_through = -1  # last step handed to the loggers, this segment or earlier ones
        self._logged_before = -1  # last step an earlier segment of this run handed to them

    # ---- producers -----------------------------------------------------------------------

    def declare(self, group: str, infos: list[MetricInfo], n_members: int, every_n_steps: int = 1) -> None:
        """Register a cadence group before training starts (called from producers' ``setup``);
        ``every_n_steps`` sizes the file for the space check."""
        names = [i.name for i in infos]
        if len(set(names)) != len(names):
            raise ValueError(f"timeline group {group!r}: duplicate metric names")
        self.groups[group] = _Group(infos, n_members, every_n_steps)

    def append(self, group: str, steps: np.ndarray, values: np.ndarray) -> None:
        """Write rows: steps (n,), values (n, n_metrics, n_members). Raises NonFiniteMetricError
        (after committing the rows) if any value is NaN or infinite."""
        self._open()
        if self.file is None:
            return  # not rank zero, or not training
        g = self.file[group]
        n_old = g["step"].shape[0]
        n_new = n_old + len(steps)
        try:
            g["step"].resize((n_new,))
            g["values"].resize((n_new, *g["values"].shape[1:]))
            g["step"][n_old:] = steps
            g["values"][n_old:] = values.astype(np.float32)
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write the timeline ({error}); "
                                     f"rows committed before are kept") from None
        dense = ~np.array([i.sparse for i in self.groups[group].infos])  # sparse metrics may be NaN
        bad = ~np.isfinite(values) & dense[None, :, None]
        if bad.any():
            row, metric, member = np.argwhere(bad)[0]
            self.commit()
            name = self.groups[group].infos[metric].name
            raise NonFiniteMetricError(
                f"training diverged: {name} is {values[row, metric, member]} for member {member} at step "
                f"{int(steps[row])}; the timeline {self.path} keeps every row up to it")

    def queue_log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one step's logger dict until the next commit."""
        if self.file is not None:
            self._pending_logs.append((step, metrics))

    def commit(self) -> None:
        """Mark every written row as committed, flush the file to disk, then hand the queued
        logger dicts over (merged per step, in step order; steps an earlier segment sent are
        skipped)."""
        trainer = getattr(self, "_trainer", None)
        for callback in trainer.callbacks if trainer is not None else ():
            if callback is not self and hasattr(callback, "hand_over"):
                callback.hand_over(trainer)  # producers' device buffers -> append()
        if self.file is None:  # not rank zero (or not training): the buffers are emptied all the same
            self._pending_logs.clear()
            self._pending_snapshots.clear()
            return
        try:
            self._write_snapshots()
            for name in self.groups:
                self.file[name]["committed"][0] = self.file[name]["step"].shape[0]
            by_step: dict[int, dict[str, float]] = defaultdict(dict)
            for step, metrics in self._pending_logs:
                if step > self._logged_before:
                    by_step[step].update(metrics)
            self._pending_logs.clear()
            if by_step:
                self._logged_through = max(self._logged_through, max(by_step))
                self.file["meta/logged_through"][0] = self._logged_through
            self.file.flush()
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write the timeline ({error}); "
                                     f"rows committed before are kept") from None
        for step in sorted(by_step):
            for logger in trainer.loggers if trainer is not None else ():
                logger.log_metrics(by_step[step], step=step)

    # ---- file set-up ---------------------------------------------------------------------

    def _create(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> h5py.File:
        """A new file with meta, ground truth, empty groups and snapshot slots (not yet SWMR)."""
        libver = "latest" if self.live else None  # never "latest" without SWMR (DESIGN.md)
        f = h5py.File(path, "w", libver=libver)
        meta = f.create_group("meta")
        meta["schema_version"] = str(SCHEMA_VERSION)
        meta["package_version"] = devinterp.__version__
        config = {"model": dict(pl_module.hparams), "data": dict(trainer.datamodule.hparams)}
        meta["config"] = yaml.safe_dump(config, sort_keys=False)
        meta.create_dataset("logged_through", data=np.full(1, -1, dtype=np.int64))
        language = trainer.datamodule.language
        meta["language_spec"] = trainer.datamodule.spec_text  # a corpus: its description
        truth = f.create_group("ground_truth")
        truth["vocab"] = _strings(language.vocab.tokens).astype(STRING)
        truth["categories"] = _strings(language.vocab.categories).astype(STRING)
        truth["token_category"] = language.vocab.token_category
        truth["label_names"] = _strings(language.label_names).astype(STRING)
        truth["rule_names"] = _strings(language.rule_names).astype(STRING)
        for key, array in language.ground_truth().items():
            truth[key] = np.asarray(array)
        for name, group in self.groups.items():
            self._create_group(f, name, group)
        self._create_snapshots(f, trainer, pl_module)
        return f

    def _start(self, f: h5py.File) -> None:
        self.file = f
        if self.live:
            f.swmr_mode = True  # every dataset exists by now, as SWMR requires

    @staticmethod
    def _create_group(f: h5py.File, name: str, group: _Group) -> None:
        g = f.create_group(name)
        n_metrics, M = len(group.infos), group.n_members
        chunk_rows = max(1, min(1024, 2**18 // max(1, n_metrics * M * 4)))
        g.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk_rows,))
        g.create_dataset("values", shape=(0, n_metrics, M), maxshape=(None, n_metrics, M), dtype=np.float32,
                         chunks=(chunk_rows, n_metrics, M))
        g["names"] = _strings(i.name for i in group.infos).astype(STRING)
        info = g.create_group("metric_info")
        for field in ("kind", "primitive", "rule"):
            info[field] = _strings(getattr(i, field) for i in group.infos).astype(STRING)
        info["nothing"] = np.array([i.nothing for i in group.infos], dtype=np.float64)
        info["learned"] = np.array([i.learned for i in group.infos], dtype=np.float64)
        info["sparse"] = np.array([i.sparse for i in group.infos], dtype=bool)
        g.create_dataset("committed", data=np.zeros(1, dtype=np.int64))

    def _create_snapshots(self, f: h5py.File, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot_steps = log_spaced_steps(trainer.max_steps, self.n_snapshots)
        s = f.create_group("snapshots")
        s.create_dataset("step", data=np.full(len(self.snapshot_steps), -1, dtype=np.int64))
        s["planned_step"] = self.snapshot_steps
        for name, param in pl_module.model.named_parameters():
            s.create_dataset(name, shape=(len(self.snapshot_steps), *param.shape), dtype=np.float32)

    def expected_bytes(self, max_steps: int, n_parameters: int) -> int:
        """About how large the finished file will be: every group's rows, the snapshots, and
        1 MiB for meta, ground truth and HDF5's own structures."""
        rows = sum((max_steps // g.every_n_steps + 2) * (len(g.infos) * g.n_members * 4 + 8)
                   for g in self.groups.values())
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
                f"{self.path}: the timeline needs about {timeline / mib:.1f} MiB for {trainer.max_steps} steps "
                f"and a checkpoint {checkpoint / mib:.1f} MiB, but the file-size limit (ulimit -f) is "
                f"{limit / mib:.1f} MiB")
        free = shutil.disk_usage(self.path.parent).free
        if timeline + checkpoint > free:
            raise TimelineWriteError(
                f"{self.path}: the timeline needs about {timeline / mib:.1f} MiB for {trainer.max_steps} steps "
                f"and checkpoints {checkpoint / mib:.1f} MiB, but the disk has {free / mib:.1f} MiB free")

    def _resume(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Copy the old file's committed rows before ``step`` into a fresh file that replaces it."""
        try:
            old = _open_killed(self.path)
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot resume, the old timeline does not open ({error})") from None
        partial = self.path.with_name(self.path.name + ".resume")
        with old:
            new = self._create(trainer, pl_module, partial)
            try:
                for name, group in self.groups.items():
                    if name not in old:
                        raise TimelineWriteError(f"{self.path}: cannot resume, the old timeline has no group {name!r}")
                    old_names = [v.decode() if isinstance(v, bytes) else str(v) for v in old[name]["names"][()]]
                    if old_names != [i.name for i in group.infos] or old[name]["values"].shape[2] != group.n_members:
                        raise TimelineWriteError(
                            f"{self.path}: cannot resume, group {name!r} was written with other metrics or "
                            "members than this run computes; resume with the run's own config.yaml")
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
            finally:
                new.close()
        os.replace(partial, self.path)  # the old file stays whole until the copy is complete
        self._start(h5py.File(self.path, "r+", libver="latest" if self.live else None))
        self._replay_lost_logs(trainer, step)

    def _replay_lost_logs(self, trainer: L.Trainer, step: int) -> None:
        """Send again the rows before ``step`` that earlier W&B segments lost when their process
        was killed (their writer had not yet put them on disk), from the timeline."""
        try:
            persisted = last_logged_step(Path(trainer.default_root_dir) / "wandb")
        except Exception:  # an unreadable W&B file: trust what was handed over
            persisted = None
        if persisted is None or persisted >= self._logged_before:
            return
        self._logged_before = persisted
        for name in self.groups:
            steps = self.file[name]["step"][()]
            lost = np.flatnonzero((steps > persisted) & (steps < step))
            if len(lost):
                values = self.file[name]["values"][lost[0]:lost[-1] + 1]
                for callback in trainer.callbacks:
                    if hasattr(callback, "replay_logs"):
                        callback.replay_logs(trainer, name, steps[lost], values)

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open()

    def _open(self) -> None:
        """Create (or, resuming, reopen) the file once training has started and the restored
        step is known; producers may call in first, from their own on_train_start."""
        trainer, pl_module = getattr(self, "_trainer", None), getattr(self, "_module", None)
        if self.file is not None or trainer is None or not trainer.is_global_zero:
            return
        self.path = Path(trainer.default_root_dir) / self.filename
        if trainer.global_step > 0 and self.path.exists():
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
            self._start(self._create(trainer, pl_module, self.path))
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write the timeline ({error})") from None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._snapshot(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.flush_every_n_steps == 0:
            self.commit()

    def on_train_end(self, trainer, pl_module) -> None:
        self._snapshot(trainer.global_step, pl_module, final=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Close after every callback's on_train_end has handed over its last rows."""
        self.close()
        self._trainer = self._module = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:  # producers hand over what they buffered, then everything is committed
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

    def _write_snapshots(self) -> None:
        if not self._pending_snapshots:
            return
        s = self.file["snapshots"]
        try:
            for slot, step, weights in self._pending_snapshots:
                for name, value in weights.items():
                    s[name][slot] = value.float().cpu().numpy()
                s["step"][slot] = step
        except OSError as error:
            raise TimelineWriteError(f"{self.path}: cannot write a weight snapshot ({error})") from None
        finally:
            self._pending_snapshots.clear()

    def state_dict(self) -> dict:
        """Rows per group when the checkpoint was taken; a resume truncates to the restored step."""
        rows = {}
        if self.file is not None:
            rows = {name: int(self.file[name]["step"].shape[0]) for name in self.groups}
        return {"filename": self.filename, "rows": rows}


def _open_killed(path: Path) -> h5py.File:
    """Open a timeline for reading whatever state its writer left it in (a killed SWMR writer's
    file opens only as an SWMR reader)."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", swmr=True, libver="latest")


def log_spaced_steps(max_steps: int, n: int) -> np.ndarray:
    """About n distinct steps from 0 to max_steps, log-spaced in step + 1, both ends included."""
    if n <= 0 or max_steps is None or max_steps < 0:
        return np.zeros(0, dtype=np.int64)
    steps = np.round(np.geomspace(1, max_steps + 1, num=n)).astype(np.int64) - 1
    return np.union1d(steps, [0, max_steps])
