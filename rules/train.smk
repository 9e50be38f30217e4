rule train_lora:
    input:
        latents=rules.merge_latents.output.index,
        text=rules.cache_text.output.index,
        model=rules.weights.output.model,
        manifest=rules.weights.output.manifest,
        # This job draws no grids (validate_lora does): it never loads the validation code.
        code=code("train_lora", without=["sdxl.train.validation"]),
    # Checkpoints, snapshots and metrics.csv are not declared: Snakemake deletes the declared
    # outputs of a job before it reruns, and these are what a rerun continues from.
    output:
        lora=f"{TRAIN_DIR}/lora_final.safetensors",
        lora_pt=f"{TRAIN_DIR}/lora_final.pt",
        config=f"{TRAIN_DIR}/config.json",
    log:
        log_file(f"train_lora/{config['run']}"),
    benchmark:
        benchmark_file(f"train_lora/{config['run']}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        gpu=config["train"]["gpus"],
    params:
        train=inputs.train_settings(config),
        run=config["run"],
    message:
        "Training the LoRA of run {params.run}"
    script:
        "../workflow_scripts/train_lora.py"


rule validate_lora:
    input:
        lora=rules.train_lora.output.lora,
        model=rules.weights.output.model,
        manifest=rules.weights.output.manifest,
        samples=sample_prompts_file,
        code=code("validate_lora"),
    # The grids beside index.json are not declared: a rerun keeps those of unchanged snapshots.
    output:
        index=f"{VALIDATION_DIR}/index.json",
    log:
        log_file(f"validate_lora/{config['run']}"),
    benchmark:
        benchmark_file(f"validate_lora/{config['run']}")
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        validation=inputs.validation_settings(config),
        run=config["run"],
    message:
        "Drawing the validation grids of run {params.run} from its LoRA snapshots"
    script:
        "../workflow_scripts/validate_lora.py"
