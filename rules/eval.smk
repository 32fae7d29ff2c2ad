# Embedding and evaluation of the pretrained model. embed writes the cell embeddings of the
# tokenized cells; evaluate scores them against a PCA baseline on cell-type labels and draws UMAPs.
# Outputs marked report(...) go into `snakemake --report report.html`.


rule embed:
    """Cell embeddings of the validation cells (embed.cells: validation) or of every cell (all)."""
    input:
        shards=rules.tokenize_shards.output.shards,
        binned=rules.normalize_bin.output.h5ad,
        model=rules.pretrain.output.model,
        args=rules.pretrain.output.args,
        vocab=rules.pretrain.output.vocab,
    output:
        h5ad=f"{RESULTS}/embeddings.h5ad",
    log:
        f"{LOGS}/embed.log",
    benchmark:
        f"{BENCH}/embed.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    params:
        embed=config["embed"],
    script:
        "../workflow/scripts/embed.py"


if PARENT:

    rule embed_zero_shot:
        """train.init_from: the same cells embedded by the continued model as it was (zero-shot),
        for evaluate to set beside the adapted one."""
        input:
            shards=rules.tokenize_shards.output.shards,
            binned=rules.normalize_bin.output.h5ad,
            model=f"{PARENT}/best_model.pt",
            args=f"{PARENT}/args.json",
        output:
            h5ad=f"{RESULTS}/evaluation/zero_shot_embeddings.h5ad",
        log:
            f"{LOGS}/embed_zero_shot.log",
        benchmark:
            f"{BENCH}/embed_zero_shot.tsv"
        conda:
            "../envs/train.yaml"
        threads: 4
        params:
            embed=config["embed"],
        script:
            "../workflow/scripts/embed.py"


rule evaluate:
    """kNN accuracy/macro-F1, Leiden ARI/NMI, silhouettes and scIB metrics of the embeddings and
    of a PCA baseline on the labelled cells, the kNN F1 per cell type and the confusion counts;
    masked-value error of the best model; UMAPs."""
    input:
        unpack(zero_shot_inputs),
        embeddings=rules.embed.output.h5ad,
        filtered=rules.filter_qc.output.h5ad,
        hvg=rules.select_hvg.output.table,
        epochs=rules.pretrain.output.epochs,
        args=rules.pretrain.output.args,
    output:
        table=report(
            f"{RESULTS}/evaluation/metrics.tsv",
            caption="../workflow/report/metrics_tsv.rst",
            category="Evaluation",
            labels={"figure": "metrics table (TSV)"},
        ),
        html=report(
            f"{RESULTS}/evaluation/metrics.html",
            caption="../workflow/report/metrics.rst",
            category="Evaluation",
            labels={"figure": "metrics table"},
        ),
        umap_cell_type=report(
            f"{RESULTS}/evaluation/umap_cell_type.png",
            caption="../workflow/report/umap_cell_type.rst",
            category="Evaluation",
            labels={"figure": "UMAP by cell type"},
        ),
        umap_sample=report(
            f"{RESULTS}/evaluation/umap_sample.png",
            caption="../workflow/report/umap_sample.rst",
            category="Evaluation",
            labels={"figure": "UMAP by sample"},
        ),
        per_cell_type=report(
            f"{RESULTS}/evaluation/per_cell_type.tsv",
            caption="../workflow/report/per_cell_type.rst",
            category="Evaluation",
            labels={"figure": "kNN F1 per cell type (TSV)"},
        ),
        confusion=f"{RESULTS}/evaluation/confusion.tsv",
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    conda:
        "../envs/eval.yaml"
    threads: 2
    params:
        evaluate=config["evaluate"],
    script:
        "../workflow/scripts/evaluate.py"


rule training_pca:
    """PCA of the training cells' log-normalized vocabulary genes, kept in the model folder: the
    zero-shot baseline that cells the model never saw are projected onto."""
    input:
        filtered=rules.filter_qc.output.h5ad,
        hvg=rules.select_hvg.output.table,
        split=rules.split.output.table,
    output:
        npz=f"{RESULTS}/model/training_pca.npz",
    log:
        f"{LOGS}/training_pca.log",
    benchmark:
        f"{BENCH}/training_pca.tsv"
    conda:
        "../envs/eval.yaml"
    params:
        pca={k: config["evaluate"][k] for k in ("n_pcs", "max_cells", "seed")},
    script:
        "../workflow/scripts/training_pca.py"


# Only defined when asked for (heldout.path), so a run without held-out cells has no such target.
if config["heldout"]["path"]:

    rule evaluate_heldout:
        """The same scores on cells the model never saw (heldout.path): embedded like `scllm embed`,
        against PCA fitted on those cells and the training cells' PCA projected onto them."""
        input:
            h5ad=config["heldout"]["path"],
            model=rules.pretrain.output.model,
            args=rules.pretrain.output.args,
            vocab=rules.pretrain.output.vocab,
            training_pca=rules.training_pca.output.npz,
        output:
            embeddings=f"{RESULTS}/evaluation/heldout/embeddings.h5ad",
            table=report(
                f"{RESULTS}/evaluation/heldout/metrics.tsv",
                caption="../workflow/report/heldout.rst",
                category="Evaluation",
                labels={"figure": "held-out metrics table (TSV)"},
            ),
            html=f"{RESULTS}/evaluation/heldout/metrics.html",
            umap_cell_type=report(
                f"{RESULTS}/evaluation/heldout/umap_cell_type.png",
                caption="../workflow/report/heldout.rst",
                category="Evaluation",
                labels={"figure": "held-out UMAP by cell type"},
            ),
            per_cell_type=f"{RESULTS}/evaluation/heldout/per_cell_type.tsv",
            confusion=f"{RESULTS}/evaluation/heldout/confusion.tsv",
        log:
            f"{LOGS}/evaluate_heldout.log",
        benchmark:
            f"{BENCH}/evaluate_heldout.tsv"
        conda:
            "../envs/heldout.yaml"
        threads: 2
        params:
            heldout={k: v for k, v in config["heldout"].items() if k != "path"},
            evaluate={
                k: v for k, v in config["evaluate"].items() if k not in ("label_key", "batch_key")
            },
            embed={k: v for k, v in config["embed"].items() if k in ("batch_size", "device")},
        script:
            "../workflow/scripts/evaluate_heldout.py"


rule report:
    """One self-contained page: samples, QC, HVGs, pretraining, metrics, F1 per cell type and
    confusion, UMAPs and how the run was made, with captions; with heldout.path, the scores on
    cells the model never saw."""
    input:
        unpack(heldout_report_inputs),
        samples=rules.sample_census.output.samples,
        qc=rules.filter_qc.output.table,
        hvg=rules.select_hvg.output.table,
        epochs=rules.pretrain.output.epochs,
        loss_curve=rules.pretrain.output.plot,
        metrics=rules.evaluate.output.table,
        umap_cell_type=rules.evaluate.output.umap_cell_type,
        umap_sample=rules.evaluate.output.umap_sample,
        per_cell_type=rules.evaluate.output.per_cell_type,
        confusion=rules.evaluate.output.confusion,
        qc_cells=rules.filter_qc.output.cells_table,  # the QC figure, drawn into the page
        training_pca=rules.training_pca.output.npz,  # so its time is in "How this run was made"
        run_record=rules.run_record.output.record,
    output:
        html=f"{RESULTS}/report.html",
    log:
        f"{LOGS}/report.log",
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow/scripts/report.py"
