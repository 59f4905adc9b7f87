"""A timeline without its weight snapshots: a study's analysis inputs, small enough to commit.

    python -m analysis.slim RUN/timeline.h5 OUT.h5

Every group, dataset and attribute is copied, values bit for bit, except ``snapshots`` (the
weights at log-spaced steps: nearly all of a file's size); chunked datasets are compressed
(gzip with byte shuffling; h5py reads them as before). `devinterp analyze` reads the copy as a run made with
``--timeline.n_snapshots 0``: onsets, ordering, dependence, stages (of the metrics) and
attribution are the same; the figures drawn from weights (direct path, QK maps, essential
dynamics) and `devinterp llc` need the full file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py

WEIGHTS = "snapshots"


def slim(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` without its weight snapshots; returns ``target``."""
    if source.resolve() == target.resolve():
        raise ValueError(f"{target}: the copy must not replace its source")
    with h5py.File(source, "r") as old, h5py.File(target, "w") as new:
        new.attrs.update(old.attrs)

        def copy(name: str, item) -> None:
            if name == WEIGHTS or name.startswith(f"{WEIGHTS}/"):
                return
            if isinstance(item, h5py.Group):
                new.require_group(name).attrs.update(item.attrs)
                return
            if item.chunks is None:  # small, contiguous: as it is
                old.copy(item, new, name=name)
                return
            packed = new.create_dataset(
                name,
                data=item[()],
                chunks=item.chunks,
                maxshape=item.maxshape,
                compression="gzip",
                shuffle=True,
            )
            packed.attrs.update(item.attrs)

        old.visititems(copy)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m analysis.slim RUN/timeline.h5 OUT.h5", file=sys.stderr)
        return 2
    try:
        out = slim(Path(argv[0]), Path(argv[1]))
    except (OSError, ValueError) as error:
        print(f"analysis.slim: {error}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
