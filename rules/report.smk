rule report:
    input:
        lora=rules.train_lora.output.lora,
        code=code("report"),
    output:
        loss=report(
            "results/report/loss_curve.svg",
            caption="../report/loss_curve.rst",
            category="Training",
        ),
        config=report(
            "results/report/config.html",
            caption="../report/config.rst",
            category="Configuration",
        ),
        validation=report(
            directory("results/report/validation"),
            patterns=["{name}.png"],
            caption="../report/validation.rst",
            category="Training",
            subcategory="Validation grids",
            labels={"grid": "{name}"},
        ),
    log:
        log_file("report"),
    conda:
        "../envs/torch.yaml"
    params:
        config=config,
    message:
        "Drawing the loss curve and collecting the report pieces"
    script:
        "../workflow_scripts/report.py"
