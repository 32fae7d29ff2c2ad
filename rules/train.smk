# Pretraining on the tokenized shards. The job asks for `gpu` GPUs (a SLURM profile turns that
# into --gpus); with more than one, the script launches one process per GPU through torchrun,
# and with `nodes` > 1 (profile) on every node of the SLURM job (srun + torchrun, scllm.launch).


rule pretrain:
    input:
        unpack(parent_files),  # train.init_from: the model it continues
        shards=rules.tokenize_shards.output.shards,
    output:
        model=f"{RESULTS}/model/best_model.pt",
        args=f"{RESULTS}/model/args.json",
        vocab=f"{RESULTS}/model/vocab.json",
        metrics=f"{RESULTS}/model/metrics.tsv",
        epochs=f"{RESULTS}/model/epochs.tsv",
        plot=report(
            f"{RESULTS}/model/loss_curve.png",
            caption="../workflow/report/loss_curve.rst",
            category="Pretraining",
        ),
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{BENCH}/pretrain.tsv"
    conda:
        "../envs/train.yaml"
    threads: 8
    resources:
        gpu=1,
    params:
        model=config["model"],
        train=config["train"],
    script:
        "../workflow/scripts/pretrain.py"
