rule generate:
    input:
        lora=rules.train_lora.output.lora,
        model=rules.weights.output.model,
        manifest=rules.weights.output.manifest,
        prompts=prompts_file,
        code=code("generate"),
    # The images go to the folder beside this file (not declared: a rerun keeps every image
    # whose recorded parameters are still the ones asked for, untouched).
    output:
        done=f"{GENERATE_DIR}/shard-{{shard}}.json",
    log:
        log_file("generate/shard-{shard}"),
    benchmark:
        benchmark_file("generate/shard-{shard}")
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        generate=inputs.generation_settings(config),
        indices=shard_range,
        index_width=index_width(config["generate"]["num_images"]),
    message:
        "Generating images {params.indices[0]} to {params.indices[1]} (shard {wildcards.shard})"
    script:
        "../workflow_scripts/generate.py"


rule assemble:
    input:
        shards=expand(f"{GENERATE_DIR}/shard-{{shard}}.json", shard=GENERATE_SHARDS),
        lora=rules.train_lora.output.lora,
        model=rules.weights.output.model,
        prompts=prompts_file,
        code=code("assemble"),
    output:
        captions=f"{DATASET_DIR}/captions.json",
        metadata=f"{DATASET_DIR}/metadata.jsonl",
        sheet=f"{DATASET_DIR}/contact_sheet.png",
    log:
        log_file("assemble"),
    benchmark:
        benchmark_file("assemble")
    conda:
        "../envs/torch.yaml"
    params:
        generate=inputs.generation_settings(config),
        num_images=config["generate"]["num_images"],
        index_width=index_width(config["generate"]["num_images"]),
    message:
        "Assembling the generated images into one COCO dataset (hard links, no copies)"
    script:
        "../workflow_scripts/assemble.py"


# output_format webdataset: the finished dataset packed into tars. It reruns after every assemble,
# keeping each tar that already holds the images asked for (see sdxl/generate/webdataset.py).
rule pack_webdataset:
    input:
        metadata=rules.assemble.output.metadata,
        code=code("pack_webdataset"),
    output:
        index=f"{DATASET_DIR}/webdataset/shards.json",
    log:
        log_file("pack_webdataset"),
    benchmark:
        benchmark_file("pack_webdataset")
    conda:
        "../envs/torch.yaml"
    params:
        shard_size=config["generate"]["webdataset_shard_size"],
    message:
        "Packing the dataset into WebDataset tars of {params.shard_size} images"
    script:
        "../workflow_scripts/pack_webdataset.py"
