# From a Census to tokenized shards. Each rule's params carry only its own config section, so
# editing one setting reruns that stage and the ones after it, never the ones before. The
# scripts read `chunk_size` from the config directly: it bounds memory, not results, so
# changing it reruns nothing.


rule sample_census:
    """Blood primary cells, whole (dataset, donor) samples chosen at random under the cap, from a
    Census or (census.source: h5ad) straight from your h5ad, streamed in row blocks."""
    input:
        unpack(census_input),
    output:
        cells=f"{RESULTS}/cells.h5ad",
        samples=f"{RESULTS}/samples.tsv",
    log:
        f"{LOGS}/sample_census.log",
    benchmark:
        f"{BENCH}/sample_census.tsv"
    conda:
        "../envs/data.yaml"
    params:
        census=sampling_params,
    script:
        "../workflow/scripts/sample_census.py"


rule filter_qc:
    input:
        cells=rules.sample_census.output.cells,
    output:
        h5ad=f"{RESULTS}/filtered.h5ad",
        table=f"{RESULTS}/qc.tsv",
        cells_table=f"{RESULTS}/qc_cells.tsv.gz",
    log:
        f"{LOGS}/filter_qc.log",
    benchmark:
        f"{BENCH}/filter_qc.tsv"
    conda:
        "../envs/data.yaml"
    params:
        qc=config["qc"],
    script:
        "../workflow/scripts/filter_qc.py"


if PARENT:

    rule select_hvg:
        """train.init_from: the vocabulary is the continued model's (its genes.tsv, in token
        order), marking the genes these cells lack; they never appear in the tokens."""
        input:
            unpack(parent_files),
            h5ad=rules.filter_qc.output.h5ad,
        output:
            table=f"{RESULTS}/hvg.tsv",
        log:
            f"{LOGS}/select_hvg.log",
        benchmark:
            f"{BENCH}/select_hvg.tsv"
        conda:
            "../envs/data.yaml"
        script:
            "../workflow/scripts/vocabulary_from_model.py"

else:

    rule select_hvg:
        input:
            h5ad=rules.filter_qc.output.h5ad,
        output:
            table=f"{RESULTS}/hvg.tsv",
        log:
            f"{LOGS}/select_hvg.log",
        benchmark:
            f"{BENCH}/select_hvg.tsv"
        conda:
            "../envs/data.yaml"
        params:
            hvg=config["hvg"],
        script:
            "../workflow/scripts/select_hvg.py"


rule normalize_bin:
    input:
        h5ad=rules.filter_qc.output.h5ad,
        hvg=rules.select_hvg.output.table,
    output:
        h5ad=f"{RESULTS}/binned.h5ad",
    log:
        f"{LOGS}/normalize_bin.log",
    benchmark:
        f"{BENCH}/normalize_bin.tsv"
    conda:
        "../envs/data.yaml"
    threads: 2
    params:
        normalize_bin=config["normalize_bin"],
    script:
        "../workflow/scripts/normalize_bin.py"


rule split:
    input:
        h5ad=rules.normalize_bin.output.h5ad,
    output:
        table=f"{RESULTS}/split.tsv",
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    conda:
        "../envs/data.yaml"
    params:
        split=config["split"],
    script:
        "../workflow/scripts/split.py"


rule tokenize_shards:
    input:
        h5ad=rules.normalize_bin.output.h5ad,
        split=rules.split.output.table,
    output:
        shards=directory(f"{RESULTS}/shards"),
    log:
        f"{LOGS}/tokenize_shards.log",
    benchmark:
        f"{BENCH}/tokenize_shards.tsv"
    conda:
        "../envs/data.yaml"
    params:
        tokenize=config["tokenize"],
    script:
        "../workflow/scripts/tokenize_shards.py"
