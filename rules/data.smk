rule validate_captions:
    message:
        "Validating the images and captions of {params.data[dir]}"
    input:
        data=dataset_files,
        model=rules.weights.output.model,
        code=code("validate"),
    output:
        manifest="results/data/manifest.csv",
        problems="results/data/problems.tsv",
        html=report(
            "results/data/problems.html",
            caption="../report/problems.rst",
            category="Dataset",
        ),
    params:
        data=config["data"],
    log:
        log_file("validate_captions"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/validate_captions.py"
