"""Train/validation assignment of cells: at random by cell, or by whole samples (held-out donors).

A random cell split puts cells of every donor in both sets, so validation loss measures
within-donor generalisation; ``by="sample"`` holds whole samples out instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path
from scllm.h5ad import open_backed, require_obs_columns

log = logging.getLogger("scllm")
TRAIN, VALIDATION = "train", "validation"


def assign_split(obs: pd.DataFrame, validation_fraction: float, by: str, seed: int) -> pd.Series:
    """Assign each cell to train or validation, at random by cell or by whole samples.

    By cell: a ``validation_fraction`` of the cells, rounded, at least one in each set where
    there are two cells. By sample: samples are visited in seeded order and one is held out when
    it brings the validation size closer to the target (so one large sample does not overshoot
    it); at least one sample is held out and at least one kept.

    Parameters
    ----------
    obs : pandas.DataFrame
        The cells; ``by="sample"`` reads its ``sample`` column.
    validation_fraction : float
        The share of cells to hold out.
    by : str
        "cell" or "sample".
    seed : int
        The seed of the draw.

    Returns
    -------
    pandas.Series
        "train" or "validation" per cell, indexed as ``obs``, named ``split``.

    Raises
    ------
    ValueError
        ``by`` is neither, or ``by="sample"`` with fewer than two samples.
    """
    n = len(obs)
    rng = np.random.default_rng(seed)
    split = np.full(n, TRAIN, dtype=object)
    if by == "cell":
        n_val = int(round(validation_fraction * n))
        if n >= 2:
            n_val = min(max(n_val, 1), n - 1)  # both sets non-empty
        split[rng.permutation(n)[:n_val]] = VALIDATION
    elif by == "sample":
        sizes = obs.groupby(obs["sample"].astype(str), sort=True).size()
        if len(sizes) < 2:
            raise ValueError(
                f"split.by='sample' needs at least two samples, but the data hold {len(sizes)}; "
                "use split.by='cell' or sample more donors"
            )
        # Visit samples in seeded order; hold one out when it brings the validation size closer
        # to the target (so one large sample does not overshoot it), always at least one.
        target = validation_fraction * n
        held_out, total = [], 0
        for i in rng.permutation(len(sizes)):
            size = int(sizes.iloc[i])
            if len(held_out) == len(sizes) - 1:
                break
            if not held_out or abs(total + size - target) < abs(total - target):
                held_out.append(sizes.index[i])
                total += size
        split[obs["sample"].astype(str).isin(held_out).to_numpy()] = VALIDATION
    else:
        raise ValueError(f"split.by={by!r} is not one of 'cell', 'sample'")
    return pd.Series(split, index=obs.index, name="split")


def split_cells(
    in_h5ad: str | Path,
    out_tsv: str | Path,
    *,
    validation_fraction: float = 0.03,
    by: str = "cell",
    seed: int = 0,
) -> pd.DataFrame:
    """Split the cells of an h5ad into train and validation and write the table (``assign_split``).

    Parameters
    ----------
    in_h5ad : str or Path
        The cells (an h5ad of the pipeline, with a ``sample`` obs column).
    out_tsv : str or Path
        The table to write.
    validation_fraction : float, default 0.03
        The share of cells to hold out.
    by : str, default "cell"
        "cell" or "sample" (hold whole samples out).
    seed : int, default 0
        The seed of the draw.

    Returns
    -------
    pandas.DataFrame
        The table written: ``cell``, ``sample`` and ``split`` per cell.

    Raises
    ------
    CorruptArtifactError
        A cell id occurs more than once (it could land in both sets).
    """
    adata = open_backed(in_h5ad)
    require_obs_columns(adata, ["sample"], in_h5ad)
    obs = adata.obs
    adata.file.close()
    if obs.index.has_duplicates:  # one id in both sets would leak a cell into validation
        dup = obs.index[obs.index.duplicated()].unique()
        raise CorruptArtifactError(
            f"{in_h5ad} holds {len(dup)} cell id(s) more than once (e.g. {dup[:3].tolist()}), "
            "so a split could list one id in both train and validation. sample_census writes "
            "unique ids: rerun the pipeline from there with `snakemake --forcerun sample_census`."
        )
    split = assign_split(obs, validation_fraction, by, seed)
    table = pd.DataFrame(
        {"cell": obs.index, "sample": obs["sample"].astype(str).values, "split": split.values}
    )
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    counts = table.groupby("split").agg(cells=("cell", "size"), samples=("sample", "nunique"))
    log.info(
        "split (by %s, seed %d, validation fraction %.3f): %d cells in ->\n%s",
        by,
        seed,
        validation_fraction,
        len(table),
        counts.to_string(),
    )
    return table


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a split table written by ``split_cells``.

    Parameters
    ----------
    path : str or Path
        The table.

    Returns
    -------
    pandas.DataFrame
        ``cell``, ``sample`` and ``split`` per cell, as strings.
    """
    return pd.read_csv(path, sep="\t", dtype={"cell": str, "sample": str, "split": str})
