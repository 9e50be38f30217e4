wildcard_constraints:
    shard=r"\d+",


rule cache_latents:
    input:
        manifest=rules.validate_captions.output.manifest,
        model=rules.weights.output.model,
        code=code("cache_latents"),
    output:
        tensors=f"{CACHE_DIR}/latents/shard-{{shard}}.safetensors",
        meta=f"{CACHE_DIR}/latents/shard-{{shard}}.json",
    log:
        log_file("cache_latents/shard-{shard}"),
    benchmark:
        benchmark_file("cache_latents/shard-{shard}")
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        latents=config["cache"]["latents"],
    message:
        "Caching VAE latents, shard {wildcards.shard}"
    script:
        "../workflow_scripts/cache_latents.py"


rule merge_latents:
    input:
        tensors=expand(
            f"{CACHE_DIR}/latents/shard-{{shard}}.safetensors", shard=LATENT_SHARDS
        ),
        meta=expand(f"{CACHE_DIR}/latents/shard-{{shard}}.json", shard=LATENT_SHARDS),
        code=code("merge_latents"),
    output:
        index=f"{CACHE_DIR}/latents/index.json",
    log:
        log_file("merge_latents"),
    benchmark:
        benchmark_file("merge_latents")
    conda:
        "../envs/torch.yaml"
    message:
        "Writing the index of the latent cache"
    script:
        "../workflow_scripts/merge_latents.py"


rule cache_text:
    input:
        manifest=rules.validate_captions.output.manifest,
        model=rules.weights.output.model,
        code=code("cache_text"),
    output:
        index=f"{CACHE_DIR}/text/index.json",
    log:
        log_file("cache_text"),
    benchmark:
        benchmark_file("cache_text")
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        text=config["cache"]["text"],
    message:
        "Caching the text embeddings of the captions"
    script:
        "../workflow_scripts/cache_text.py"
