rule weights:
    message:
        "Preparing the SDXL weights from {params.weights[source]}"
    input:
        source=weights_source,
        code=weights_code(),
    output:
        model=directory(f"{WEIGHTS_DIR}/model"),
        manifest=f"{WEIGHTS_DIR}/manifest.json",
    params:
        weights=config["weights"],
    log:
        log_file("weights"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/weights.py"
