rule validate_captions:
    input:
        data=dataset_files,
        model=rules.weights.output.model,
        code=code("validate_captions"),
    output:
        manifest="results/data/manifest.csv",
        problems="results/data/problems.tsv",
        html="results/data/problems.html",
    log:
        log_file("validate_captions"),
    benchmark:
        benchmark_file("validate_captions")
    conda:
        "../envs/torch.yaml"
    params:
        data=inputs.data_settings(config),
        folders=", ".join(folder for _, folder, _ in inputs.data_folders(config)),
    message:
        "Validating the images and captions of {params.folders}"
    script:
        "../workflow_scripts/validate_captions.py"
