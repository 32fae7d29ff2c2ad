"""Token sequences from binned cells, and tokenize_shards end to end (shards, vocab, manifest)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.prep.tokenize import tokenize_shards
from scllm.shards import read_shard
from scllm.tokens import sequences_from_binned

N_GENES = 30
N_CELLS = 53


def test_sequences_from_binned_layout():
    cls_id = 9
    # row 0 with unsorted column indices, row 1 empty, row 2 with an explicit zero
    indptr = np.array([0, 3, 3, 6])
    indices = np.array([7, 2, 4, 0, 5, 8])
    data = np.array([50, 3, 1, 12, 0, 7], dtype=np.uint8)
    binned = sp.csr_matrix((data, indices, indptr), shape=(3, 9))
    dense = binned.toarray()  # the truth, computed before the call
    offsets, gene_ids, values = sequences_from_binned(binned, cls_id)

    np.testing.assert_array_equal(offsets, [0, 4, 5, 8])  # lengths = non-zeros + 1
    assert gene_ids.dtype.kind == "i" and values.dtype.kind == "i"  # signed: pad -2 / mask -1 fit
    for i in range(3):
        g, v = gene_ids[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]]
        assert g[0] == cls_id and v[0] == 0
        cols = np.flatnonzero(dense[i])  # column order
        np.testing.assert_array_equal(g[1:], cols)
        np.testing.assert_array_equal(v[1:], dense[i, cols])


def test_sequences_from_binned_random():
    rng = np.random.default_rng(0)
    dense = rng.integers(1, 51, size=(40, 25)) * (rng.random((40, 25)) < 0.3)
    offsets, gene_ids, values = sequences_from_binned(sp.csr_matrix(dense.astype(np.uint8)), 25)
    np.testing.assert_array_equal(np.diff(offsets), (dense > 0).sum(axis=1) + 1)
    for i in range(40):
        g, v = gene_ids[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]]
        rebuilt = np.zeros(25, dtype=np.int64)
        rebuilt[g[1:]] = v[1:]
        np.testing.assert_array_equal(rebuilt, dense[i])
        assert np.all(np.diff(g[1:]) > 0)


@pytest.fixture(scope="module")
def binned_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(3)
    dense = rng.integers(1, 51, size=(N_CELLS, N_GENES)) * (
        rng.random((N_CELLS, N_GENES)) < rng.uniform(0.05, 0.9, (N_CELLS, 1))
    )
    dense[0] = 0
    dense[0, 4] = 17  # a cell with a single HVG
    dense[10] = rng.integers(1, 51, N_GENES)  # a cell expressing every HVG
    X = sp.csr_matrix(dense.astype(np.uint8))
    names = [f"ds:cell{i:03d}" for i in range(N_CELLS)]
    samples = np.repeat(["s0", "s1", "s2", "s3"], [15, 12, 20, 6])
    ids = [f"ENSG{1000 + 7 * i:011d}" for i in range(N_GENES)]
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"sample": pd.Categorical(samples)}, index=names),
        var=pd.DataFrame(
            {"feature_id": ids, "feature_name": [f"G{i}" for i in range(N_GENES)]}, index=ids
        ),
        uns={"binning": {"n_bins": 51, "seed": 0, "target_sum": 1e4, "log1p": False}},
    )
    adata.write_h5ad(root / "binned.h5ad")
    split = np.where(rng.random(N_CELLS) < 0.3, "validation", "train")
    pd.DataFrame({"cell": names, "sample": samples, "split": split}).to_csv(
        root / "split.tsv", sep="\t", index=False
    )
    return root, dense, split, ids


def run_tokenize(binned_inputs, name):
    root = binned_inputs[0]
    manifest = tokenize_shards(
        root / "binned.h5ad", root / "split.tsv", root / name, cells_per_shard=7, chunk_size=10
    )
    return root / name, manifest


def test_tokenize_shards_end_to_end(binned_inputs):
    _, dense, split, ids = binned_inputs
    out, manifest = run_tokenize(binned_inputs, "shards_a")
    G = N_GENES

    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == {**{g: i for i, g in enumerate(ids)}, "<cls>": G, "<pad>": G + 1}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert (
        manifest["vocab_size"] == G + 2 and manifest["cls_id"] == G and manifest["pad_id"] == G + 1
    )
    assert manifest["n_bins"] == 51
    assert manifest["max_seq_len"] == int((dense > 0).sum(axis=1).max()) + 1 == G + 1
    assert set(manifest["splits"]) == {"train", "validation"}

    for name in ("train", "validation"):
        expected_cells = np.flatnonzero(split == name)
        shards = manifest["splits"][name]
        assert len(shards) == -(-len(expected_cells) // 7) > 1  # several shards per split
        assert all(s["n_cells"] == 7 for s in shards[:-1]) and 1 <= shards[-1]["n_cells"] <= 7
        seen = []
        for entry in shards:
            shard = read_shard(out / entry["path"])
            assert shard.n_cells == entry["n_cells"]
            assert len(shard.gene_ids) == entry["n_tokens"]
            assert shard.lengths.max() == entry["max_len"]
            assert (
                shard.attrs["split"] == name
                and shard.attrs["cls_id"] == G
                and shard.attrs["pad_id"] == G + 1
            )
            assert shard.attrs["n_bins"] == 51
            for j, row in enumerate(shard.cell_index):
                g, v = shard.cell(j)
                assert g[0] == G and v[0] == 0
                cols = np.flatnonzero(dense[row])
                np.testing.assert_array_equal(g[1:], cols, err_msg=f"cell {row}")
                np.testing.assert_array_equal(v[1:], dense[row, cols], err_msg=f"cell {row}")
            seen.extend(shard.cell_index.tolist())
        # every cell of the split exactly once, none of the other split
        assert sorted(seen) == expected_cells.tolist()
        assert sum(s["n_cells"] for s in shards) == len(expected_cells)
        assert sum(s["n_tokens"] for s in shards) == int(
            (dense[expected_cells] > 0).sum() + len(expected_cells)
        )


def test_tokenize_shards_byte_identical(binned_inputs):
    a, _ = run_tokenize(binned_inputs, "shards_x")
    b, _ = run_tokenize(binned_inputs, "shards_y")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert sum(p.suffix == ".h5" for p in files_a) >= 4
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_truncated_shard_is_reported(binned_inputs, tmp_path):
    out, manifest = run_tokenize(binned_inputs, "shards_t")
    path = out / manifest["splits"]["train"][0]["path"]
    data = path.read_bytes()
    broken = tmp_path / "broken.h5"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tokenize_shards"):
        read_shard(broken)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="tokenize_shards"):
        read_shard(empty)


def test_split_table_must_match_cells(binned_inputs, tmp_path):
    root = binned_inputs[0]
    table = pd.read_csv(root / "split.tsv", sep="\t")
    table.iloc[::-1].to_csv(tmp_path / "reversed.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="split"):
        tokenize_shards(
            root / "binned.h5ad", tmp_path / "reversed.tsv", tmp_path / "out", cells_per_shard=7
        )
