# From a Census to tokenized shards, each stage in its own folder results/data/<rule>-<key>/
# (rules/common.smk: FOLDERS), keyed by its settings and those upstream, so runs that share
# sampling and preprocessing share these files. Each rule's params carry only its own config
# section, so editing one setting reruns that stage and the ones after it, never the ones
# before. The scripts read `chunk_size` and `tokenize.cells_per_shard` from the config
# directly: they shape memory and files, not results, so changing them reruns nothing.


rule sample_census:
    """Blood primary cells, whole (dataset, donor) samples chosen at random under the cap, from a
    Census or (census.source: h5ad) straight from your h5ad, streamed in row blocks."""
    input:
        unpack(census_input),
    output:
        cells=f"{FOLDERS['sample_census']}/cells.h5ad",
        samples=f"{FOLDERS['sample_census']}/samples.tsv",
    log:
        data_log("sample_census"),
    benchmark:
        data_benchmark("sample_census")
    conda:
        "../envs/data.yaml"
    params:
        census=sampling_settings(),
    script:
        "../workflow/scripts/sample_census.py"


rule filter_qc:
    input:
        cells=rules.sample_census.output.cells,
    output:
        h5ad=f"{FOLDERS['filter_qc']}/filtered.h5ad",
        table=f"{FOLDERS['filter_qc']}/qc.tsv",
        cells_table=f"{FOLDERS['filter_qc']}/qc_cells.tsv.gz",
    log:
        data_log("filter_qc"),
    benchmark:
        data_benchmark("filter_qc")
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
            table=f"{FOLDERS['select_hvg']}/hvg.tsv",
        log:
            data_log("select_hvg"),
        benchmark:
            data_benchmark("select_hvg")
        conda:
            "../envs/data.yaml"
        script:
            "../workflow/scripts/vocabulary_from_model.py"

else:

    rule select_hvg:
        input:
            h5ad=rules.filter_qc.output.h5ad,
        output:
            table=f"{FOLDERS['select_hvg']}/hvg.tsv",
        log:
            data_log("select_hvg"),
        benchmark:
            data_benchmark("select_hvg")
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
        h5ad=f"{FOLDERS['normalize_bin']}/binned.h5ad",
    log:
        data_log("normalize_bin"),
    benchmark:
        data_benchmark("normalize_bin")
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
        table=f"{FOLDERS['split']}/split.tsv",
    log:
        data_log("split"),
    benchmark:
        data_benchmark("split")
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
        shards=directory(f"{FOLDERS['tokenize_shards']}/shards"),
    log:
        data_log("tokenize_shards"),
    benchmark:
        data_benchmark("tokenize_shards")
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/tokenize_shards.py"


rule run_record:
    """results/<run>/run.json: the resolved config, the data folders this run reads, the code's
    commit and package versions, and where each rule recorded its time and memory."""
    input:
        cells=rules.sample_census.output.cells,
        filtered=rules.filter_qc.output.h5ad,
        hvg=rules.select_hvg.output.table,
        binned=rules.normalize_bin.output.h5ad,
        split=rules.split.output.table,
        shards=rules.tokenize_shards.output.shards,
    output:
        record=f"{RESULTS}/run.json",
    log:
        f"{LOGS}/run_record.log",
    conda:
        "../envs/data.yaml"
    params:
        # what decides results (chunk_size and cells_per_shard shape memory and files only), in
        # one key order: the order config files were merged in must not count as a change
        config=json.loads(json.dumps(deciding_settings(config), sort_keys=True)),
        data=FOLDERS,
        benchmarks=run_benchmarks(),
        # the file that named the run, None for run: (changes only with how the run is named)
        named_by=NAMED_BY,
    script:
        "../workflow/scripts/run_record.py"
