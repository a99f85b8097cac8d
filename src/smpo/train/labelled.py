"""A labelled dataset's rows (``smpo label`` / ``smpo pairs`` output: parquet shards), read at random.

The label columns are read once; the images (``jpg_0``/``jpg_1``) or stored latents of a row are
read with its row group only when a batch asks for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smpo.labels import is_tie

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1")
BULK_COLUMNS = ("jpg_0", "jpg_1", "latent_0", "latent_1")  # read per row group, only when a batch needs them


class LabelledPairs:
    """Random access to a labelled dataset's rows; image columns are read only when asked for.

    ``drop_ties``: leave out pairs whose human label ``label_0`` is 0.5 (binary labels use the
    human label; ALGORITHM.md section 4).
    """

    def __init__(self, folder: str | Path, *, max_pairs: int | None = None, drop_ties: bool = False):
        import pyarrow.dataset as ds

        self.folder = Path(folder)
        files = sorted(self.folder.rglob("*.parquet")) if self.folder.is_dir() else [self.folder]
        if not files or not files[0].exists():
            raise FileNotFoundError(f"no parquet shards found in {self.folder} (expected the output of `smpo label`)")
        self._dataset = ds.dataset([str(f) for f in files], format="parquet")
        self._files = [str(f) for f in files]
        # Where each row of the files is: (file, row group) of every group, and the groups' first rows.
        # Dataset.take would scan the files up to the rows it is asked for; a row group is read instead.
        self._groups: list[tuple[int, int]] = []
        starts = [0]
        for i, fragment in enumerate(self._dataset.get_fragments()):
            for g, group in enumerate(fragment.metadata.to_dict()["row_groups"]):
                self._groups.append((i, g))
                starts.append(starts[-1] + group["num_rows"])
        self._group_starts = np.asarray(starts)
        self._handles: dict[int, Any] = {}
        self._last_group: tuple[Any, Any] | None = None  # the last group read (neighbouring rows share it)
        names = self._dataset.schema.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{self.folder}: missing column(s) {', '.join(missing)}; "
                             f"expected {', '.join(REQUIRED_COLUMNS)} (+ pair_id, winner, p_win, label_0); "
                             f"found {', '.join(names)}")
        meta = self._dataset.to_table(columns=[c for c in names if c not in BULK_COLUMNS]).to_pydict()
        total = len(meta["caption"])
        meta["pair_id"] = [str(p) for p in meta.get("pair_id", range(total))]
        keep = range(total if max_pairs is None else min(max_pairs, total))
        if drop_ties and "label_0" in meta:
            keep = [i for i in keep if not is_tie(meta["label_0"][i])]
        self.rows_in_files = list(keep)  # dataset position -> row in the parquet files
        self.meta = {k: [v[i] for i in self.rows_in_files] for k, v in meta.items()}
        self.columns = names

    def __len__(self) -> int:
        return len(self.rows_in_files)

    def rows(self, indices: list[int], *, images: bool = True, latents: bool = False) -> list[dict[str, Any]]:
        """The rows at ``indices`` as dicts (with ``jpg_0``/``jpg_1`` bytes when ``images``, or
        ``latent_0``/``latent_1`` bytes when ``latents``: `smpo pairs --keep-latents`)."""
        out = [{k: v[i] for k, v in self.meta.items()} for i in indices]
        if latents and "latent_0" not in self.columns:
            raise ValueError(f"{self.folder}: data.stored_latents needs the latent_0/latent_1 columns of a set "
                             "made by `smpo pairs --keep-latents`; this set has none")
        columns = ("latent_0", "latent_1") if latents else ("jpg_0", "jpg_1")
        if images or latents:
            for row, i in zip(out, indices):
                row.update(zip(columns, self._bulk(self.rows_in_files[i], columns)))
        return out

    def _bulk(self, file_row: int, columns: tuple[str, str]) -> tuple[bytes, bytes]:
        """Two bulk columns (images or latents) of one row of the files, read with its row group."""
        import pyarrow.parquet as pq

        group = int(np.searchsorted(self._group_starts, file_row, side="right")) - 1
        if self._last_group is None or self._last_group[0] != (group, columns):
            f, g = self._groups[group]
            if f not in self._handles:
                self._handles[f] = pq.ParquetFile(self._files[f])
            self._last_group = ((group, columns), self._handles[f].read_row_group(g, columns=list(columns)))
        table, at = self._last_group[1], file_row - int(self._group_starts[group])
        return table.column(columns[0])[at].as_py(), table.column(columns[1])[at].as_py()
