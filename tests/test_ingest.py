"""Bringing your own h5ad in, streamed: every input layout gives the cells.h5ad that today's path
gave (the whole file read into memory and written into a local Census by tiledbsoma's
``from_anndata``, then sampled), by both streamed routes: sample_census straight from the h5ad
(the pipeline's census.source: h5ad) and build_local_census's block-wise store. And where
build-census may write: never over a file, a folder holding its input or a folder it did not
build."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm import census as census_mod
from scllm.census import build_local_census, sample_census, sample_h5ad
from scllm.cli import main as cli_main
from scllm.errors import InputError, UnsafeOutputError
from scllm.ingest import H5adInput

from conftest import snapshot, synthetic_source

SAMPLING = dict(max_cells=90, seed=0, disease="normal", chunk_size=16)


def todays_store(h5ad, uri, gene_tile: int | None = None) -> None:
    """The store as build_local_census wrote it before streaming: X read whole into memory,
    cast to float32 CSR, written by tiledbsoma.io.from_anndata in one go. ``gene_tile``: TileDB
    tiles spanning that many genes, as in the real Census (whose tiles do not span all genes,
    so a read returns values tile by tile, not cell by cell)."""
    import tiledbsoma as soma
    import tiledbsoma.io

    with H5adInput(h5ad) as source:
        obs, var, _ = census_mod._census_shaped(
            source,
            "source",
            None,
            None,
            None,
            None,
            None,
            None,
            "blood",
            True,
            "normal",
            "test input",
        )
    obs.index = obs.index.astype(str)
    X = sp.csr_matrix(ad.read_h5ad(h5ad).X, dtype=np.float32)
    uri = str(uri.resolve())
    soma.Collection.create(uri).close()
    with soma.Collection.open(uri, "w") as root:
        root.add_new_collection("census_data")
    tiles = (
        {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": gene_tile}}}}}
        if gene_tile
        else None
    )
    tiledbsoma.io.from_anndata(
        f"{uri}/census_data/homo_sapiens",
        ad.AnnData(X=X, obs=obs, var=var),
        measurement_name="RNA",
        X_layer_name="raw",
        platform_config=tiles,
    )
    with soma.Collection.open(uri, "w") as root:
        root["census_data"].set(
            "homo_sapiens",
            soma.Experiment.open(f"{uri}/census_data/homo_sapiens"),
            use_relative_uri=True,
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    synthetic_source().write_h5ad(root / "source.h5ad")
    todays_store(root / "source.h5ad", root / "store")
    sample_census(root / "cells.h5ad", root / "samples.tsv", uri=str(root / "store"), **SAMPLING)
    return ad.read_h5ad(root / "cells.h5ad"), (root / "samples.tsv").read_text()


def layout(name: str) -> tuple[ad.AnnData, dict, dict]:
    """The synthetic source in one of the layouts users have; (AnnData, its build options, write
    options)."""
    src = synthetic_source()
    if name == "csc":
        src.X = sp.csc_matrix(src.X)
    elif name == "dense":
        src.X = src.X.toarray()
    elif name == "int_counts":
        src.X = src.X.astype(np.int32)
    elif name == "unsorted_with_stored_zeros":
        # a non-canonical CSR (same counts): genes out of order within rows; in every fifth row a
        # stored zero, and a count split in two entries of the same gene
        X = src.X.tocoo()
        row, col, data = X.row, X.col, X.data
        extra_rows = np.arange(0, src.n_obs, 5)
        zero_cols = [np.setdiff1d(np.arange(src.n_vars), col[row == r])[0] for r in extra_rows]
        halves = np.r_[[np.flatnonzero((row == r) & (data >= 2))[0] for r in extra_rows]]
        split = np.floor(data[halves] / 2)
        data = data.copy()
        data[halves] -= split
        row, col, data = (
            np.r_[row, extra_rows, row[halves]],
            np.r_[col, zero_cols, col[halves]],
            np.r_[data, 0 * extra_rows, split],
        )
        order = np.random.default_rng(1).permutation(len(row))
        X = _csr_keeping_entries(
            sp.coo_matrix((data[order], (row[order], col[order])), shape=src.shape)
        )
        src.X = X
    elif name == "counts_layer":
        src.layers["counts"] = src.X.copy()
        src.X = sp.csr_matrix(np.log1p(src.X.toarray()))  # normalized values in X
        return src, {"counts_layer": "counts"}, {}
    elif name == "gzip_chunked":
        return src, {}, {"compression": "gzip"}
    elif name != "csr":
        raise ValueError(name)
    return src, {}, {}


def _csr_keeping_entries(coo: sp.coo_matrix) -> sp.csr_matrix:
    """CSR with every COO entry kept as stored (scipy's conversion would merge repeats)."""
    order = np.argsort(coo.row, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(coo.row, minlength=coo.shape[0]))]
    X = sp.csr_matrix(coo.shape, dtype=coo.dtype)
    X.data, X.indices, X.indptr = coo.data[order], coo.col[order].astype(np.int32), indptr
    return X


LAYOUTS = [
    "csr",
    "csc",
    "dense",
    "int_counts",
    "unsorted_with_stored_zeros",
    "counts_layer",
    "gzip_chunked",
]


def assert_same_cells(path, samples_path, reference) -> None:
    ref, ref_samples = reference
    cells = ad.read_h5ad(path)
    assert isinstance(cells.X, sp.csr_matrix) and cells.X.dtype == np.float32
    for part in ("indptr", "indices", "data"):  # the same bytes of X, not just equal values
        np.testing.assert_array_equal(getattr(cells.X, part), getattr(ref.X, part))
    pd.testing.assert_frame_equal(cells.obs, ref.obs)
    pd.testing.assert_frame_equal(cells.var, ref.var)
    assert samples_path.read_text() == ref_samples


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_sampled_straight_from_the_h5ad_gives_todays_cells(
    name, reference, tmp_path, caplog
):
    src, options, write = layout(name)
    src.write_h5ad(tmp_path / "in.h5ad", **write)
    # blocks of a few cells, so that samples and blocks cut across each other
    with caplog.at_level(logging.INFO, logger="scllm"):
        sample_h5ad(
            tmp_path / "in.h5ad",
            tmp_path / "cells.h5ad",
            tmp_path / "samples.tsv",
            block_nnz=200,
            **options,
            **SAMPLING,
        )
    # stored zeros and repeated genes change row lengths: counted first, then written
    assert ("counting every row's values first" in caplog.text) == (
        name == "unsorted_with_stored_zeros"
    )
    assert ("temporary local Census" in caplog.text) == (name == "csc")
    assert_same_cells(tmp_path / "cells.h5ad", tmp_path / "samples.tsv", reference)
    # nothing but the two outputs (a CSC input's temporary store is gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "in.h5ad", "samples.tsv"]


@pytest.mark.parametrize(
    "name", ["csr", "csc", "dense", "unsorted_with_stored_zeros", "counts_layer"]
)
def test_every_layout_through_a_streamed_store_gives_todays_cells(name, reference, tmp_path):
    src, options, write = layout(name)
    src.write_h5ad(tmp_path / "in.h5ad", **write)
    build_local_census(tmp_path / "in.h5ad", tmp_path / "store", block_nnz=150, **options)
    sample_census(
        tmp_path / "cells.h5ad", tmp_path / "samples.tsv", uri=str(tmp_path / "store"), **SAMPLING
    )
    assert_same_cells(tmp_path / "cells.h5ad", tmp_path / "samples.tsv", reference)


def test_a_store_tiled_across_genes_is_read_into_the_same_cells(reference, tmp_path, monkeypatch):
    """The real Census's layout: values come back tile by tile, and sample_census puts each
    cell's genes back in order itself."""
    synthetic_source().write_h5ad(tmp_path / "in.h5ad")
    todays_store(tmp_path / "in.h5ad", tmp_path / "store", gene_tile=8)
    sorts = []
    real_sort = sp.csr_matrix.sort_indices
    monkeypatch.setattr(
        sp.csr_matrix, "sort_indices", lambda self: sorts.append(1) or real_sort(self)
    )
    sample_census(
        tmp_path / "cells.h5ad", tmp_path / "samples.tsv", uri=str(tmp_path / "store"), **SAMPLING
    )
    assert sorts  # the reordering path ran
    assert_same_cells(tmp_path / "cells.h5ad", tmp_path / "samples.tsv", reference)


def test_samples_spread_over_the_file_are_written_whole_and_in_order(tmp_path):
    """Cells of each donor scattered through the file (as in a file sorted by cell type): each
    sample is still one block of rows, its cells in file order, with their own counts."""
    src = synthetic_source()
    order = np.random.default_rng(3).permutation(src.n_obs)
    src = src[order].copy()
    src.write_h5ad(tmp_path / "in.h5ad")
    sample_h5ad(
        tmp_path / "in.h5ad",
        tmp_path / "cells.h5ad",
        tmp_path / "samples.tsv",
        block_nnz=100,
        max_cells=1000,
        primary_only=False,
        disease=None,
    )
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    blood = src.obs["tissue_general"].to_numpy() == "blood"
    assert cells.n_obs == blood.sum()
    rows = cells.obs["census_soma_joinid"].to_numpy()  # the input row of each cell
    np.testing.assert_array_equal(cells.X.toarray(), src.X[rows].toarray())
    label = cells.obs["sample"].astype(str).to_numpy()
    runs = label[np.r_[True, label[1:] != label[:-1]]]
    assert len(runs) == len(set(runs))  # contiguous samples
    for sample in set(runs):
        assert np.all(np.diff(rows[label == sample]) > 0)  # file order within a sample


def test_blocks_hold_at_most_the_budget(tmp_path):
    src = synthetic_source()
    src.write_h5ad(tmp_path / "in.h5ad")
    with H5adInput(tmp_path / "in.h5ad") as source:
        matrix = source.matrix(None)
        budget = 150
        seen = 0
        for stop, block, start in matrix.row_blocks(budget, max_rows=7):
            assert start == seen and block.shape[0] == stop - start <= 7
            assert block.nnz <= budget or block.shape[0] == 1
            np.testing.assert_array_equal(block.toarray(), src.X[start:stop].toarray())
            seen = stop
        assert seen == src.n_obs
        np.testing.assert_array_equal(matrix.row_nnz(budget), np.diff(src.X.indptr))


def test_bad_counts_in_chosen_cells_name_the_fix_and_leave_nothing(tmp_path):
    src = synthetic_source()
    src.layers["counts"] = src.X.copy()
    dense = src.X.toarray()
    dense[-1, 0] = 0.5  # in the last block: earlier blocks are already written when it is found
    src.X = sp.csr_matrix(dense)
    src.obs["tissue_general"] = "blood"
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(
        InputError,
        match=r"X of the input h5ad holds values that are not non-negative integer "
        r"counts \(non-integer.*census\.h5ad\.counts_layer.*\['counts'\]",
    ):
        sample_h5ad(
            tmp_path / "in.h5ad",
            tmp_path / "out/cells.h5ad",
            tmp_path / "out/samples.tsv",
            block_nnz=100,
            max_cells=1000,
            primary_only=False,
            disease=None,
        )
    assert list((tmp_path / "out").iterdir()) == []
    # the same file as CSC goes through a temporary store: refused the same way, nothing left
    src.X = sp.csc_matrix(src.X)
    src.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="non-integer"):
        sample_h5ad(
            tmp_path / "csc.h5ad",
            tmp_path / "out/cells.h5ad",
            tmp_path / "out/samples.tsv",
            block_nnz=100,
            max_cells=1000,
            primary_only=False,
            disease=None,
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_gene_ids_and_layers_are_refused_before_reading_counts(tmp_path):
    src = synthetic_source()
    src.var = pd.DataFrame(index=[f"GENE{i}" for i in range(src.n_vars)])  # symbols only
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(
        ValueError, match=r"no Ensembl gene ids found in var.*census\.h5ad\.gene_id_column"
    ):
        sample_h5ad(
            tmp_path / "in.h5ad", tmp_path / "out/cells.h5ad", tmp_path / "out/samples.tsv"
        )
    with pytest.raises(InputError, match=r"no layer 'counts' \(census\.h5ad\.counts_layer"):
        sample_h5ad(
            tmp_path / "in.h5ad",
            tmp_path / "out/cells.h5ad",
            tmp_path / "out/samples.tsv",
            counts_layer="counts",
        )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_damaged_h5ad_is_refused_clearly(tmp_path):
    synthetic_source().write_h5ad(tmp_path / "in.h5ad")
    data = (tmp_path / "in.h5ad").read_bytes()
    (tmp_path / "in.h5ad").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cannot read .*in\.h5ad as h5ad.*export it again"):
        sample_h5ad(
            tmp_path / "in.h5ad", tmp_path / "out/cells.h5ad", tmp_path / "out/samples.tsv"
        )
    assert not (tmp_path / "out/cells.h5ad").exists()


# --- where build-census may write: nothing it did not build is replaced --------------------------


def run_build(capsys, h5ad, out, *options) -> tuple[int, str]:
    code = cli_main(["build-census", str(h5ad), str(out), *options])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_the_folder_holding_the_input_is_never_the_store(tmp_path, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    synthetic_source().write_h5ad(mydata / "cells.h5ad")
    (mydata / "notes.txt").write_text("the user's notes")
    before, advice = snapshot(mydata), tmp_path / "mydata_store"
    for options in ((), ("--overwrite",)):
        code, err = run_build(capsys, mydata / "cells.h5ad", mydata, *options)
        assert code == 1
        assert f"the input {mydata / 'cells.h5ad'} lies inside the output folder {mydata}" in err
        assert f"give a folder path outside it that does not exist yet, e.g. {advice}" in err
        assert snapshot(mydata) == before
    assert run_build(capsys, mydata / "cells.h5ad", advice)[0] == 0  # the advice works
    assert census_mod._built_from(tmp_path / "mydata_store") == "cells.h5ad"
    assert snapshot(mydata) == before


def test_a_file_or_a_foreign_folder_is_never_the_store(tmp_path, capsys):
    synthetic_source().write_h5ad(tmp_path / "in.h5ad")
    existing = tmp_path / "existing_file.h5ad"
    existing.write_bytes((tmp_path / "in.h5ad").read_bytes())
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.tsv").write_text("a\tb\n")
    for out, problem in (
        (existing, f"the output {existing} is a file, not a store folder"),
        (folder, f"the output {folder} is a folder that is not a store scllm build-census built"),
    ):
        before = snapshot(out)
        for options in ((), ("--overwrite",)):
            code, err = run_build(capsys, tmp_path / "in.h5ad", out, *options)
            assert code == 1 and problem in err
            advice = out.with_name(out.stem + "_store")
            assert f"give a folder path that does not exist yet, e.g. {advice}" in err
            assert snapshot(out) == before
        assert run_build(capsys, tmp_path / "in.h5ad", advice)[0] == 0  # the advice works
        assert census_mod._built_from(advice) == "in.h5ad"
    with pytest.raises(UnsafeOutputError, match="is a file, not a store folder"):  # Python too
        build_local_census(tmp_path / "in.h5ad", existing, overwrite=True)


def test_its_own_earlier_store_is_replaced_only_with_overwrite(tmp_path, capsys):
    synthetic_source().write_h5ad(tmp_path / "first.h5ad")
    synthetic_source(seed=1).write_h5ad(tmp_path / "second.h5ad")
    store = tmp_path / "store"
    assert run_build(capsys, tmp_path / "first.h5ad", store)[0] == 0
    before = snapshot(store)
    code, err = run_build(capsys, tmp_path / "second.h5ad", store)
    assert code == 1
    assert f"the output {store} holds a store scllm build-census built earlier (from " in err
    assert "first.h5ad)" in err and "pass --overwrite (overwrite=True in Python)" in err
    with pytest.raises(UnsafeOutputError, match="pass --overwrite"):
        build_local_census(tmp_path / "second.h5ad", store)
    assert snapshot(store) == before
    assert run_build(capsys, tmp_path / "second.h5ad", store, "--overwrite")[0] == 0
    assert census_mod._built_from(store) == "second.h5ad"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.h5ad", "second.h5ad", "store"]
