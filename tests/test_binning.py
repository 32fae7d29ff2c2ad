"""scGPT's per-cell quantile binning (bin_csr) and normalize_total, against plain reference
code."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.prep.binning import bin_csr, content_keys, normalize_bin, normalize_total

# ---------------------------------------------------------------------------------------------
# Reference: scGPT's binning written plainly (scgpt/preprocess.py: Preprocessor + _digitize)
# ---------------------------------------------------------------------------------------------


def ref_edges(nz: np.ndarray, n_bins: int) -> np.ndarray:
    return np.quantile(nz, np.linspace(0, 1, n_bins - 1))


def ref_bins_no_ties(nz: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's _digitize on a cell whose edges are distinct: just the left digitize."""
    return np.digitize(nz, ref_edges(nz, n_bins))


def ref_allowed_range(nz: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """scGPT's _digitize draws ceil(u * (right - left) + left), u in [0, 1):
    a bin in [right + 1, left] where right < left, else exactly left."""
    edges = ref_edges(nz, n_bins)
    left = np.digitize(nz, edges)
    right = np.digitize(nz, edges, right=True)
    low = np.where(left > right, right + 1, left)
    return low, left


def random_cells_without_ties(rng, lengths, n_genes, dtype=np.float64) -> sp.csr_matrix:
    """A CSR matrix whose rows hold ``lengths[i]`` distinct positive values at random columns."""
    rows, cols, vals = [], [], []
    for i, k in enumerate(lengths):
        rows += [i] * k
        cols += sorted(rng.choice(n_genes, k, replace=False).tolist())
        # distinct values with a spacing that survives float32 and log1p
        vals += (rng.choice(1_000_000, k, replace=False) / 1000.0 + 0.01).tolist()
    m = sp.csr_matrix((np.asarray(vals, dtype=dtype), (rows, cols)), shape=(len(lengths), n_genes))
    for i in range(m.shape[0]):
        row = m.data[m.indptr[i] : m.indptr[i + 1]]
        assert len(np.unique(row)) == len(row)  # precondition: no ties
    return m


def random_counts(rng, n_cells, n_genes, density=0.4) -> sp.csr_matrix:
    """Integer counts (many ties, mostly 1s and 2s) with varied cell depth."""
    dense = rng.negative_binomial(1, 0.5, size=(n_cells, n_genes)).astype(np.float32)
    dense *= rng.random((n_cells, n_genes)) < density
    dense[0, :] = 0  # an empty cell
    dense[1, :] = 0
    dense[1, 3] = 5  # a cell with one expressed gene
    return sp.csr_matrix(dense)


LENGTHS = [1, 2, 3, 7, 30, 49, 50, 51, 120, 400, 1000]


# ---------------------------------------------------------------------------------------------
# Without ties: identical to scGPT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [51, 5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bins_equal_scgpt_without_ties(n_bins, dtype):
    rng = np.random.default_rng(11)
    m = random_cells_without_ties(rng, LENGTHS + [0], n_genes=1200, dtype=dtype)
    out = bin_csr(m, n_bins=n_bins, seed=3)

    assert out.shape == m.shape
    assert out.dtype.kind == "u"  # small unsigned integer dtype
    np.testing.assert_array_equal(out.indptr, m.indptr)  # zeros stay zero: same sparsity
    np.testing.assert_array_equal(out.indices, m.indices)
    assert out.nnz == m.nnz and np.all(out.data >= 1) and np.all(out.data <= n_bins - 1)
    for i, k in enumerate(LENGTHS):
        nz = m.data[m.indptr[i] : m.indptr[i + 1]]
        got = out.data[out.indptr[i] : out.indptr[i + 1]].astype(np.int64)
        if k == 1:
            # One value: every edge equals it, so scGPT itself draws a bin among 1..n_bins-1.
            low, high = ref_allowed_range(nz, n_bins)
            assert low[0] == 1 and high[0] == n_bins - 1
            assert low[0] <= got[0] <= high[0]
        else:
            np.testing.assert_array_equal(
                got, ref_bins_no_ties(nz, n_bins), err_msg=f"cell {i} ({k} values)"
            )
    if n_bins == 51:  # a long cell uses every bin, the smallest value bin 1, the largest bin 50
        long = out.data[out.indptr[-3] : out.indptr[-2]]
        assert set(long.tolist()) == set(range(1, 51))


def test_bins_follow_values_not_column_positions():
    """The same values in another column order get the same bin per value."""
    rng = np.random.default_rng(5)
    values = rng.permutation(np.arange(1, 301, dtype=np.float64))
    a = sp.csr_matrix((values, (np.zeros(300, int), np.arange(300))), shape=(1, 300))
    perm = rng.permutation(300)
    b = sp.csr_matrix((values[perm], (np.zeros(300, int), np.arange(300))), shape=(1, 300))
    ba, bb = bin_csr(a).toarray().ravel(), bin_csr(b).toarray().ravel()
    np.testing.assert_array_equal(ba[perm], bb)
    np.testing.assert_array_equal(ba, ref_bins_no_ties(values, 51))


# ---------------------------------------------------------------------------------------------
# With ties: scGPT's random spread, but deterministic and chunk-independent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [51, 5])
def test_tied_values_in_scgpt_range(n_bins):
    rng = np.random.default_rng(0)
    m = random_counts(rng, 60, 500)
    out = bin_csr(m, n_bins=n_bins, seed=7)
    np.testing.assert_array_equal(out.indptr, m.indptr)
    np.testing.assert_array_equal(out.indices, m.indices)
    n_collapsed = 0
    for i in range(m.shape[0]):
        nz = m.data[m.indptr[i] : m.indptr[i + 1]]
        if nz.size == 0:
            continue
        got = out.data[out.indptr[i] : out.indptr[i + 1]].astype(np.int64)
        low, high = ref_allowed_range(nz, n_bins)
        bad = (got < low) | (got > high)
        assert not bad.any(), (
            f"cell {i}: values {nz[bad][:5]} got bins {got[bad][:5]}, "
            f"allowed {low[bad][:5]}..{high[bad][:5]}"
        )
        n_collapsed += int((high > low).sum())
    assert n_collapsed > 1000  # the data do exercise the tie rule


def test_ties_spread_uniformly_over_collapsed_bins():
    """A large group of equal values is spread about evenly over its collapsed bins (as scGPT's
    uniform draw), not piled into one bin."""
    n_bins = 51
    values = np.concatenate([np.ones(2000), np.arange(2, 502, dtype=np.float64)])
    m = sp.csr_matrix(values.reshape(1, -1))
    out = bin_csr(m, n_bins=n_bins, seed=1).data.astype(np.int64)
    ones = out[:2000]
    low, high = ref_allowed_range(values, n_bins)
    assert low[0] == 1 and high[0] > 20  # the ones collapse many bins
    counts = np.bincount(ones, minlength=high[0] + 1)[low[0] : high[0] + 1]
    expected = 2000 / len(counts)
    assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected, counts


def test_ties_deterministic_per_seed_and_chunk_independent():
    rng = np.random.default_rng(1)
    m = random_counts(rng, 97, 300)
    whole = bin_csr(m, n_bins=51, seed=42)
    again = bin_csr(m.copy(), n_bins=51, seed=42)
    other = bin_csr(m, n_bins=51, seed=43)
    np.testing.assert_array_equal(whole.data, again.data)
    np.testing.assert_array_equal(whole.indices, again.indices)
    assert (whole.data != other.data).sum() > 100  # another seed draws other bins for ties
    # the untied values do not depend on the seed
    for i in range(m.shape[0]):
        nz = m.data[m.indptr[i] : m.indptr[i + 1]]
        if nz.size == 0:
            continue
        low, high = ref_allowed_range(nz, 51)
        fixed = low == high
        sl = slice(whole.indptr[i], whole.indptr[i + 1])
        np.testing.assert_array_equal(whole.data[sl][fixed], other.data[sl][fixed])

    for chunk in (1, 10, 33):
        parts = [
            bin_csr(m[a : a + chunk], n_bins=51, seed=42, row_offset=a)
            for a in range(0, m.shape[0], chunk)
        ]
        chunked = sp.vstack(parts).tocsr()
        np.testing.assert_array_equal(chunked.indptr, whole.indptr)
        np.testing.assert_array_equal(chunked.indices, whole.indices)
        np.testing.assert_array_equal(chunked.data, whole.data, err_msg=f"chunk size {chunk}")
    # without the right row offset, the chunks draw differently (row_offset matters)
    wrong = sp.vstack(
        [bin_csr(m[a : a + 10], n_bins=51, seed=42) for a in range(0, m.shape[0], 10)]
    ).tocsr()
    assert (wrong.data != whole.data).any()


def test_content_keys_follow_the_counts_only():
    rng = np.random.default_rng(3)
    m = sp.random(
        40,
        30,
        density=0.3,
        format="csr",
        random_state=rng,
        data_rvs=lambda n: rng.integers(1, 4, n),
    )
    m = sp.csr_matrix(m.astype(np.int32))
    before = (m.indptr.copy(), m.indices.copy(), m.data.copy())
    keys = content_keys(m)
    assert keys.dtype == np.int64 and (keys >= 0).all() and len(set(keys.tolist())) == 40
    assert all(
        np.array_equal(x, y) for x, y in zip(before, (m.indptr, m.indices, m.data))
    )  # input untouched
    # the same counts as float64 in reverse row order: the keys follow the rows
    np.testing.assert_array_equal(content_keys(m[::-1].astype(np.float64)), keys[::-1])
    # row 0 stored with unsorted indices and an explicit zero: the same cell, the same key
    a, b = m.indptr[0], m.indptr[1]
    row0 = sp.csr_matrix(
        (
            np.r_[m.data[a:b][::-1], 0],
            np.r_[m.indices[a:b][::-1], np.setdiff1d(np.arange(30), m.indices[a:b])[0]],
            [0, b - a + 1],
        ),
        shape=(1, 30),
    )
    assert content_keys(row0)[0] == keys[0]
    changed = m.copy()
    changed.data[0] += 1
    assert content_keys(changed)[0] != keys[0] and (content_keys(changed)[1:] == keys[1:]).all()


def test_normalize_bin_gives_a_cell_the_same_bins_in_any_row(tmp_path):
    """Tie-break draws are keyed on a cell's counts: a duplicated cell gets identical bins."""
    rng = np.random.default_rng(8)
    counts = sp.random(
        12,
        20,
        density=0.5,
        format="csr",
        random_state=rng,
        data_rvs=lambda n: rng.integers(1, 3, n),
    )
    counts = sp.csr_matrix(
        sp.vstack([counts, counts[[4]]]).astype(np.float32)
    )  # cell 12 == cell 4
    genes = [f"ENSG{i:011d}" for i in range(20)]
    obs = pd.DataFrame({"sample": ["s"] * 13}, index=[f"c{i}" for i in range(13)])
    var = pd.DataFrame(
        {"feature_id": genes, "feature_name": [f"G{i}" for i in range(20)]}, index=genes
    )
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(tmp_path / "in.h5ad")
    pd.DataFrame(
        {"feature_id": genes, "feature_name": var["feature_name"], "rank": np.arange(1, 21)}
    ).to_csv(tmp_path / "hvg.tsv", sep="\t", index=False)
    for chunk in (13, 4):
        normalize_bin(
            tmp_path / "in.h5ad",
            tmp_path / "hvg.tsv",
            tmp_path / f"out{chunk}.h5ad",
            n_bins=5,
            chunk_size=chunk,
        )
    out = ad.read_h5ad(tmp_path / "out4.h5ad").X
    assert (ad.read_h5ad(tmp_path / "out13.h5ad").X != out).nnz == 0
    np.testing.assert_array_equal(out[12].toarray(), out[4].toarray())
    # ties exist here, so draws keyed on the row would have given the two copies other bins
    by_row = bin_csr(
        normalize_total(counts, np.asarray(counts.sum(axis=1)).ravel(), 1e4, False), n_bins=5
    )
    assert not np.array_equal(by_row[12].toarray(), by_row[4].toarray())


def test_explicit_zeros_are_not_binned():
    m = sp.csr_matrix(
        (np.array([0.0, 2.0, 0.0, 5.0]), np.array([0, 1, 2, 3]), np.array([0, 4])), shape=(1, 4)
    )
    out = bin_csr(m, n_bins=51)
    np.testing.assert_array_equal(out.toarray(), [[0, 1, 0, 50]])


@pytest.mark.parametrize("n_bins", [2, 257])
def test_bad_n_bins_rejected(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        bin_csr(sp.csr_matrix(np.ones((2, 3))), n_bins=n_bins)


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


def test_bins_invariant_under_normalize_total_and_log1p():
    rng = np.random.default_rng(3)
    m = random_cells_without_ties(rng, LENGTHS[1:], n_genes=1500)
    totals = np.asarray(m.sum(axis=1)).ravel()
    normalized = normalize_total(m, totals, 1e4, log1p=True)
    for i in range(normalized.shape[0]):  # precondition: the transform kept values distinct
        row = normalized.data[normalized.indptr[i] : normalized.indptr[i + 1]]
        assert len(np.unique(row)) == len(row)
    a = bin_csr(m, n_bins=51, seed=0)
    b = bin_csr(normalized, n_bins=51, seed=0)
    b.sort_indices()  # normalize_total may leave column indices unsorted within rows
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("log1p", [False, True])
def test_normalize_total_matches_scanpy(log1p):
    import scanpy as sc

    rng = np.random.default_rng(4)
    dense = rng.poisson(2.0, size=(40, 25)).astype(np.float32) * (rng.random((40, 25)) < 0.5)
    dense[5] = 0  # a cell without counts stays all zero
    counts = sp.csr_matrix(dense)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    ours = normalize_total(counts, totals, 1e4, log1p=log1p)

    ref = ad.AnnData(X=counts.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Some cells have zero counts"
        sc.pp.normalize_total(ref, target_sum=1e4)
    if log1p:
        sc.pp.log1p(ref)
    assert sp.issparse(ours)
    np.testing.assert_allclose(ours.toarray(), ref.X.toarray(), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(ours.toarray()[5], 0)
    if not log1p:  # independent check of the definition
        row_sums = np.asarray(ours.sum(axis=1)).ravel()
        np.testing.assert_allclose(row_sums[totals > 0], 1e4, rtol=1e-5)


def test_a_continued_models_genes_the_cells_lack_bin_as_not_expressed(tmp_path):
    """train.init_from: vocabulary genes marked in_data False read as zeros; the other genes get
    the bins they would get from the same counts with those genes' columns all zero."""
    from scllm.prep.hvg import vocabulary_from_model

    rng = np.random.default_rng(9)
    genes = [f"ENSG{i:011d}" for i in range(20)]
    counts = sp.csr_matrix(rng.poisson(2.0, size=(30, 20)).astype(np.float32))
    obs = pd.DataFrame({"sample": "s"}, index=[f"c{i}" for i in range(30)])
    var = pd.DataFrame({"feature_id": genes, "feature_name": "g"}, index=genes)
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(tmp_path / "full.h5ad")
    keep = [i for i in range(20) if i % 4]  # the cells lack genes 0, 4, 8, 12, 16
    ad.AnnData(X=counts[:, keep], obs=obs, var=var.iloc[keep]).write_h5ad(tmp_path / "lack.h5ad")
    model = tmp_path / "model"
    model.mkdir()
    order = rng.permutation(20)  # the model's token order
    pd.DataFrame(
        {"feature_id": np.array(genes)[order], "feature_name": "g", "rank": range(20)}
    ).to_csv(model / "genes.tsv", sep="\t", index=False)
    table = vocabulary_from_model(tmp_path / "lack.h5ad", model, tmp_path / "hvg.tsv")
    assert table["feature_id"].tolist() == list(np.array(genes)[order])
    assert set(table["feature_id"][~table["in_data"]]) == {genes[i] for i in range(0, 20, 4)}
    normalize_bin(tmp_path / "lack.h5ad", tmp_path / "hvg.tsv", tmp_path / "out.h5ad", n_bins=7)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.var_names.tolist() == table["feature_id"].tolist()
    zeroed = counts.toarray()
    zeroed[:, ::4] = 0  # the same cells with those genes unexpressed, in the full file
    full = ad.AnnData(X=sp.csr_matrix(zeroed), obs=obs, var=var)
    full.write_h5ad(tmp_path / "zeroed.h5ad")
    pd.DataFrame({**table.drop(columns="in_data")}).to_csv(
        tmp_path / "hvg_full.tsv", sep="\t", index=False
    )
    normalize_bin(
        tmp_path / "zeroed.h5ad", tmp_path / "hvg_full.tsv", tmp_path / "ref.h5ad", n_bins=7
    )
    np.testing.assert_array_equal(out.X.toarray(), ad.read_h5ad(tmp_path / "ref.h5ad").X.toarray())
    # a gene missing that the table does not mark is still a stale table
    table.assign(in_data=True).to_csv(tmp_path / "stale.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="belongs to another run"):
        normalize_bin(tmp_path / "lack.h5ad", tmp_path / "stale.tsv", tmp_path / "x.h5ad")
    # too few of the model's genes in the data: refused with the figure
    few = ad.AnnData(X=counts[:, :5], obs=obs, var=var.iloc[:5])
    few.write_h5ad(tmp_path / "few.h5ad")
    with pytest.raises(ValueError, match=r"only 5 of the 20 genes .* \(25%\)"):
        vocabulary_from_model(tmp_path / "few.h5ad", model, tmp_path / "few.tsv")
    assert not (tmp_path / "few.tsv").exists()
