"""The linear baselines a model must beat: PCA of log-normalized vocabulary genes.

Two are scored beside the model on cells it never saw. PCA fitted on those very cells is the
reference a model would have to beat with no training at all on them. The honest zero-shot
baseline is the PCA of the model's own training cells, kept in the model folder
(``training_pca.npz``: the genes' means and loadings) and projected onto the new cells: a linear
map learned from exactly the cells the model learned from.

Values are log1p(normalize_total(counts, 1e4)) of the vocabulary genes, totals over all of a
cell's genes; a vocabulary gene a file lacks reads 0 (not expressed), as it does for the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scllm.config import CHUNK_SIZE
from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path

log = logging.getLogger("scllm")

PCA_FILE = "training_pca.npz"  # in the model folder, beside best_model.pt
PROJECTED_KEY = "X_pca_train"  # obsm key of cells projected onto it


@dataclass(frozen=True)
class TrainingPCA:
    """Principal axes of the training cells' log-normalized vocabulary genes.

    Attributes
    ----------
    feature_ids : numpy.ndarray
        The vocabulary genes (Ensembl ids), in token order.
    mean : numpy.ndarray
        Per gene, over the training cells.
    components : numpy.ndarray
        n_pcs x genes, orthonormal rows, by explained variance.
    n_cells : int
        Training cells it was fitted on.
    """

    feature_ids: np.ndarray  # the vocabulary genes (Ensembl ids), in token order
    mean: np.ndarray  # per gene, over the training cells
    components: np.ndarray  # n_pcs x genes, orthonormal rows, by explained variance
    n_cells: int  # training cells it was fitted on

    def project(self, matrix) -> np.ndarray:
        """Coordinates of cells on the axes.

        Sparse input stays sparse (the centring is applied to the product).

        Parameters
        ----------
        matrix : scipy.sparse matrix or numpy.ndarray
            Cells x vocabulary genes, log-normalized, in token order.

        Returns
        -------
        numpy.ndarray
            float32, cells x n_pcs.

        Raises
        ------
        ValueError
            Another number of genes than the vocabulary's.
        """
        if matrix.shape[1] != len(self.feature_ids):
            raise ValueError(
                f"cells have {matrix.shape[1]} genes; the training PCA has "
                f"{len(self.feature_ids)} (the vocabulary)"
            )
        product = matrix @ self.components.T
        return (np.asarray(product) - self.mean @ self.components.T).astype(np.float32)

    def project_found(self, matrix, token_ids) -> np.ndarray:
        """``project`` of cells whose columns are the vocabulary genes a file holds.

        Parameters
        ----------
        matrix : scipy.sparse matrix
            Cells x the genes found, log-normalized.
        token_ids : array_like of int
            The vocabulary index of each column; the genes the file lacks read 0.

        Returns
        -------
        numpy.ndarray
            float32, cells x n_pcs.
        """
        return self.project(vocabulary_matrix(matrix, token_ids, len(self.feature_ids)))

    def save(self, path) -> None:
        """Write the PCA as an npz (float32, strings stored without pickle), atomically.

        Parameters
        ----------
        path : str or Path
            The file.
        """
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                feature_ids=self.feature_ids.astype(str),  # unicode: loads without pickle
                mean=self.mean.astype(np.float32),
                components=self.components.astype(np.float32),
                n_cells=np.int64(self.n_cells),
            )

    @classmethod
    def load(cls, path) -> TrainingPCA:
        """Read a PCA ``save`` wrote.

        Parameters
        ----------
        path : str or Path
            The file.

        Returns
        -------
        TrainingPCA

        Raises
        ------
        CorruptArtifactError
            The file cannot be read as a training PCA.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["feature_ids"], f["mean"], f["components"], int(f["n_cells"]))
        except (OSError, KeyError, ValueError) as err:
            raise CorruptArtifactError(
                f"cannot read {path} as a training PCA ({err}); rerun the rule that writes it "
                "(snakemake --forcerun training_pca)"
            ) from err


def fit_training_pca(matrix, feature_ids, *, n_pcs: int = 50, seed: int = 0) -> TrainingPCA:
    """scanpy's PCA (implicitly centred, never densified) of cells x vocabulary genes.

    Parameters
    ----------
    matrix : scipy.sparse matrix
        Log-normalized cells x vocabulary genes.
    feature_ids : array_like of str
        The vocabulary genes, one per column.
    n_pcs : int, default 50
        Axes to keep (at most one fewer than the smaller side of ``matrix``).
    seed : int, default 0
        scanpy's ``random_state``.

    Returns
    -------
    TrainingPCA

    Raises
    ------
    ValueError
        Fewer than 2 cells or 2 genes.
    """
    import anndata as ad
    import scanpy as sc

    n_pcs = int(min(n_pcs, min(matrix.shape) - 1))
    if n_pcs < 1:
        raise ValueError(f"a PCA needs at least 2 cells and 2 genes (got {matrix.shape})")
    adata = ad.AnnData(X=sp.csr_matrix(matrix, dtype=np.float32))
    sc.pp.pca(adata, n_comps=n_pcs, zero_center=True, random_state=seed)
    mean = np.asarray(adata.X.mean(axis=0), dtype=np.float64).ravel()
    return TrainingPCA(
        np.asarray(feature_ids).astype(str), mean, adata.varm["PCs"].T.copy(), matrix.shape[0]
    )


def write_training_pca(
    filtered_h5ad, hvg_tsv, split_tsv, out_npz, *, n_pcs=50, max_cells=50_000, seed=0
) -> TrainingPCA:
    """Fit the training PCA on the run's training cells and write it: the rule ``training_pca``.

    A seeded sample of at most ``max_cells`` of the training cells is used; a continued model's
    vocabulary genes these cells lack read 0.

    Parameters
    ----------
    filtered_h5ad : str or Path
        The filtered cells (counts).
    hvg_tsv : str or Path
        The HVG table: the vocabulary, in token order.
    split_tsv : str or Path
        The split table (the training cells).
    out_npz : str or Path
        The file to write (``training_pca.npz``).
    n_pcs : int, default 50
        Axes to keep.
    max_cells : int, default 50_000
        Training cells used at the most.
    seed : int, default 0
        Seed of the sample and the PCA.

    Returns
    -------
    TrainingPCA
    """
    from scllm.eval.evaluate import log_normalized_hvgs
    from scllm.prep.hvg import read_hvg_table
    from scllm.prep.split import read_split

    t0 = time.time()
    split = read_split(split_tsv)
    cells = split.loc[split["split"] == "train", "cell"].to_numpy()
    if len(cells) > max_cells:
        rng = np.random.default_rng(seed)
        cells = cells[np.sort(rng.choice(len(cells), int(max_cells), replace=False))]
    vocabulary = read_hvg_table(hvg_tsv)  # in vocabulary order
    genes = vocabulary["feature_id"].to_numpy()
    # A continued model's vocabulary may hold genes these cells lack (in_data False): zeros.
    present = vocabulary["in_data"].to_numpy()
    matrix = log_normalized_hvgs(filtered_h5ad, genes[present], cells)
    matrix = vocabulary_matrix(matrix, np.flatnonzero(present), len(genes))
    pca = fit_training_pca(matrix, genes, n_pcs=n_pcs, seed=seed)
    pca.save(out_npz)
    log.info(
        "training_pca: %d of %d training cells x %d vocabulary genes -> %d axes, written to %s "
        "in %.1fs",
        len(cells),
        int((split["split"] == "train").sum()),
        len(genes),
        pca.components.shape[0],
        out_npz,
        time.time() - t0,
    )
    return pca


def vocabulary_matrix(block: sp.csr_matrix, token_ids, n_genes: int) -> sp.csr_matrix:
    """Cells x all vocabulary genes from the columns found; genes not found are zero.

    Parameters
    ----------
    block : scipy.sparse matrix
        Cells x the genes found.
    token_ids : array_like of int
        The vocabulary index of each column of ``block``.
    n_genes : int
        The vocabulary's genes.

    Returns
    -------
    scipy.sparse.csr_matrix
        Cells x ``n_genes``.
    """
    block = sp.csr_matrix(block)
    place = sp.csr_matrix(
        (np.ones(len(token_ids), np.float32), (np.arange(len(token_ids)), token_ids)),
        shape=(len(token_ids), n_genes),
    )
    return sp.csr_matrix(block @ place)


def load_training_pca(model_dir) -> TrainingPCA:
    """The training PCA kept in a model folder.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.

    Returns
    -------
    TrainingPCA

    Raises
    ------
    FileNotFoundError
        The folder has no ``training_pca.npz`` (the message says how to write it).
    CorruptArtifactError
        The file cannot be read.
    """
    path = Path(model_dir) / PCA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the model folder has no training PCA (models trained before "
            "it was kept lack it). `snakemake --forcerun training_pca` in the run that trained "
            "the model writes it."
        )
    return TrainingPCA.load(path)


def project_training_pca(
    adata,
    model_dir,
    *,
    layer: str | None = None,
    gene_id_column: str | None = None,
    key_added: str = PROJECTED_KEY,
    copy: bool = False,
):
    """Project cells onto the PCA of a model's training cells: the zero-shot baseline.

    scanpy style: annotates ``adata`` (or a copy) in place.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes with counts in X or ``layer`` (raw counts, as for ``scllm.embed``).
    model_dir : str or Path
        A model folder holding ``training_pca.npz`` (written by the pipeline's rule
        ``training_pca``) and the model's ``vocab.json`` and ``genes.tsv``.
    layer, gene_id_column : str or None, default None
        Where the counts are, and which var column names the genes, as for ``scllm.embed``.
    key_added : str, default "X_pca_train"
        The obsm key of the projection.
    copy : bool, default False
        Return an annotated copy instead of annotating ``adata``.

    Returns
    -------
    anndata.AnnData or None
        None, or the annotated copy with ``copy=True``; ``adata.obsm[key_added]`` holds the
        cells' coordinates on the training cells' principal axes (cells x n_pcs).

    Raises
    ------
    FileNotFoundError
        The model folder has no training PCA.
    CorruptArtifactError
        The training PCA is damaged or not over the model's vocabulary.
    """
    from scllm.eval.evaluate import log_normalized_rows
    from scllm.eval.genes import checked_mapping, model_genes
    from scllm.tokens import read_vocab

    pca = load_training_pca(model_dir)
    genes = model_genes(model_dir, read_vocab(Path(model_dir) / "vocab.json"))
    if list(genes["feature_id"]) != list(pca.feature_ids):
        raise CorruptArtifactError(
            f"{Path(model_dir) / PCA_FILE} is not over the genes of "
            f"{Path(model_dir) / 'vocab.json'}; the model folder mixes files of different runs"
        )
    if copy:
        adata = adata.copy()
    matrix = adata.layers[layer] if layer else adata.X
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    mapping = checked_mapping(
        adata.var, genes, gene_id_column, where, adata.n_obs, model_dir, min_coverage=0.0
    )
    found = log_normalized_rows(
        lambda a, b: sp.csr_matrix(matrix[a:b], dtype=np.float32),
        adata.n_obs,
        mapping.columns,
        np.arange(adata.n_obs),
        chunk_size=CHUNK_SIZE,
    )
    adata.obsm[key_added] = pca.project_found(found, mapping.token_ids)  # gene ids: 0..G-1
    return adata if copy else None
