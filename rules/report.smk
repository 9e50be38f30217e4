# The report shows only what this file's `report` rule made. Snakemake copies the params of
# every job that made a report item, unescaped, into a <script> of report.html; so no report
# item comes from a job whose params hold user strings (prompts, paths), and the config page
# is rendered (escaped) from the snapshot that record_config writes.


rule record_config:
    output:
        config="results/config.json",
    log:
        log_file("record_config"),
    conda:
        "../envs/torch.yaml"
    params:
        config=config,
    message:
        "Recording the configuration of this run (config.yaml, overrides and defaults)"
    script:
        "../workflow_scripts/record_config.py"


rule report:
    input:
        lora=rules.train_lora.output.lora,
        config=rules.record_config.output.config,
        problems=rules.validate_captions.output.html,
        sheet=rules.assemble.output.sheet,
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
        problems=report(
            "results/report/problems.html",
            caption="../report/problems.rst",
            category="Dataset",
        ),
        sheet=report(
            "results/report/contact_sheet.png",
            caption="../report/contact_sheet.rst",
            category="Generated dataset",
        ),
    log:
        log_file("report"),
    conda:
        "../envs/torch.yaml"
    message:
        "Drawing the loss curve and collecting the report pieces"
    script:
        "../workflow_scripts/report.py"
