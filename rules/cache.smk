wildcard_constraints:
    shard=r"\d+",


rule cache_latents:
    message:
        "Caching VAE latents, shard {wildcards.shard}"
    input:
        manifest=rules.validate_captions.output.manifest,
        model=rules.weights.output.model,
        code=code("latents"),
    output:
        tensors=f"{CACHE_DIR}/latents/shard-{{shard}}.safetensors",
        meta=f"{CACHE_DIR}/latents/shard-{{shard}}.json",
    params:
        latents=config["cache"]["latents"],
    resources:
        gpu=1,
    threads: 4
    log:
        log_file("cache_latents/shard-{shard}"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cache_latents.py"


rule merge_latents:
    message:
        "Writing the index of the latent cache"
    input:
        tensors=expand(f"{CACHE_DIR}/latents/shard-{{shard}}.safetensors", shard=LATENT_SHARDS),
        meta=expand(f"{CACHE_DIR}/latents/shard-{{shard}}.json", shard=LATENT_SHARDS),
        code=code("merge"),
    output:
        index=f"{CACHE_DIR}/latents/index.json",
    log:
        log_file("merge_latents"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/merge_latents.py"


rule cache_text:
    message:
        "Caching the text embeddings of the captions"
    input:
        manifest=rules.validate_captions.output.manifest,
        model=rules.weights.output.model,
        code=code("text"),
    output:
        index=f"{CACHE_DIR}/text/index.json",
    params:
        text=config["cache"]["text"],
    resources:
        gpu=1,
    threads: 4
    log:
        log_file("cache_text"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cache_text.py"
