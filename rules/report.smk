# The report shows only what this file's `report` rule made. Snakemake copies the params of
# every job that made a report item, unescaped, into a <script> of report.html; so no report
# item comes from a job whose params hold user strings (prompts, paths), and the config page
# is rendered (escaped) from the snapshot that record_config writes.


rule record_config:
    input:
        code=code("record_config"),
    output:
        config="results/config.json",
    log:
        log_file("record_config"),
    benchmark:
        benchmark_file("record_config")
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
        validation=rules.validate_lora.output.index,
        config=rules.record_config.output.config,
        manifest=rules.validate_captions.output.manifest,
        problems=rules.validate_captions.output.problems,
        problems_html=rules.validate_captions.output.html,
        latents=rules.merge_latents.output.index,
        model=rules.weights.output.model,
        shards=rules.assemble.input.shards,
        metadata=rules.assemble.output.metadata,
        sheet=rules.assemble.output.sheet,
        benchmarks=all_benchmarks(),
        metrics=rules.evaluate.output.metrics if EVALUATE else [],
        code=code("report"),
    output:
        training=report(
            "results/report/training.html",
            caption="../report/training.rst",
            category="Training",
            subcategory="LoRA summary and curves",
        ),
        loss=report(
            "results/report/loss_curve.svg",
            caption="../report/loss_curve.rst",
            category="Training",
            subcategory="LoRA summary and curves",
        ),
        validation=report(
            "results/report/validation_over_time.png",
            caption="../report/validation.rst",
            category="Validation",
            subcategory="Grids over the snapshots",
        ),
        data=report(
            "results/report/data.html",
            caption="../report/data.rst",
            category="Dataset",
            subcategory="Items, buckets and captions",
        ),
        problems=report(
            "results/report/problems.html",
            caption="../report/problems.rst",
            category="Dataset",
            subcategory="Problems found",
        ),
        generation=report(
            "results/report/generation.html",
            caption="../report/generation.rst",
            category="Generated dataset",
            subcategory="Images, settings and speed",
        ),
        sheet=report(
            "results/report/contact_sheet.png",
            caption="../report/contact_sheet.rst",
            category="Generated dataset",
            subcategory="Contact sheet",
        ),
        evaluation=report(
            "results/report/evaluation.html",
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="FID, KID and CLIP score",
        ),
        runtime=report(
            "results/report/runtime.html",
            caption="../report/runtime.rst",
            category="Runtime",
            subcategory="Every job",
        ),
        config=report(
            "results/report/config.html",
            caption="../report/config.rst",
            category="Configuration",
            subcategory="config.yaml, overrides and defaults",
        ),
    log:
        log_file("report"),
    conda:
        "../envs/torch.yaml"
    message:
        "Drawing the report pages: training, validation, dataset, generation, evaluation, runtime"
    script:
        "../workflow_scripts/report.py"
