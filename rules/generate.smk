rule generate:
    message:
        "Generating images, shard {wildcards.shard}"
    input:
        lora=rules.train_lora.output.lora,
        model=rules.weights.output.model,
        manifest=rules.weights.output.manifest,
        prompts=config["generate"]["prompts_file"],
        code=code("generate"),
    # The images go to the folder beside this file (not declared, so a killed job resumes).
    output:
        done=f"{GENERATE_DIR}/shard-{{shard}}.json",
    params:
        generate=config["generate"],
    resources:
        gpu=1,
    threads: 4
    log:
        log_file("generate/shard-{shard}"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/generate.py"


rule assemble:
    message:
        "Assembling the generated images into one COCO dataset"
    input:
        shards=expand(f"{GENERATE_DIR}/shard-{{shard}}.json", shard=GENERATE_SHARDS),
        lora=rules.train_lora.output.lora,
        model=rules.weights.output.model,
        prompts=config["generate"]["prompts_file"],
        code=code("assemble"),
    output:
        captions=f"{DATASET_DIR}/captions.json",
        metadata=f"{DATASET_DIR}/metadata.jsonl",
        sheet=report(
            f"{DATASET_DIR}/contact_sheet.png",
            caption="../report/contact_sheet.rst",
            category="Generated dataset",
        ),
    params:
        generate=config["generate"],
    log:
        log_file("assemble"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/assemble.py"
