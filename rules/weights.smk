rule weights:
    input:
        source=weights_source,
        code=weights_code(),
    output:
        model=directory(f"{WEIGHTS_DIR}/model"),
        manifest=f"{WEIGHTS_DIR}/manifest.json",
    log:
        log_file("weights"),
    benchmark:
        benchmark_file("weights")
    conda:
        "../envs/torch.yaml"
    params:
        weights=config["weights"],
    message:
        "Preparing the SDXL weights from {params.weights[source]}"
    script:
        "../workflow_scripts/weights.py"
