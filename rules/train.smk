rule train_lora:
    input:
        latents=rules.merge_latents.output.index,
        text=rules.cache_text.output.index,
        model=rules.weights.output.model,
        manifest=rules.weights.output.manifest,
        code=code("train"),
    # Checkpoints and metrics.csv are not declared: Snakemake deletes the declared outputs of
    # a failed job, and these are what a rerun of a killed job resumes from.
    output:
        lora=f"{TRAIN_DIR}/lora_final.safetensors",
        lora_pt=f"{TRAIN_DIR}/lora_final.pt",
        config=f"{TRAIN_DIR}/config.json",
    log:
        log_file(f"train_lora/{config['run']}"),
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        gpu=config["train"]["gpus"],
    params:
        train=train_settings(),
    message:
        "Training the LoRA of run {config[run]} (rerun after a kill: resumes from the last checkpoint)"
    script:
        "../workflow_scripts/train_lora.py"
