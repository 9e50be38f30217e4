# Evaluation of the generated dataset: Inception features (FID, KID) and CLIP embeddings (CLIP
# score) of each generate shard, of the reference images in fixed shards, then one merge job.
# Feature jobs get only the settings their features depend on: changing clip_model reruns the
# generated side only, the KID settings rerun only the merge.


rule evaluate_features:
    input:
        done=f"{GENERATE_DIR}/shard-{{shard}}.json",
        code=code("evaluate_features"),
    output:
        features=f"{EVAL_DIR}/generated/shard-{{shard}}.safetensors",
    log:
        log_file("evaluate_features/shard-{shard}"),
    benchmark:
        benchmark_file("evaluate_features/shard-{shard}")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        features=evaluate_settings("inception", "clip_model", "batch_size"),
    message:
        "Extracting the evaluation features of generate shard {wildcards.shard}"
    script:
        "../workflow_scripts/evaluate_features.py"


rule evaluate_reference:
    input:
        images=reference_inputs,
        code=code("evaluate_reference"),
    output:
        features=f"{EVAL_DIR}/reference/shard-{{shard}}.safetensors",
    log:
        log_file("evaluate_reference/shard-{shard}"),
    benchmark:
        benchmark_file("evaluate_reference/shard-{shard}")
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        features=evaluate_settings("inception", "batch_size"),
        reference_dir=config["evaluate"]["reference_dir"],
        indices=reference_range,
    message:
        "Extracting the Inception features of reference shard {wildcards.shard}"
    script:
        "../workflow_scripts/evaluate_reference.py"


rule evaluate:
    input:
        generated=expand(
            f"{EVAL_DIR}/generated/shard-{{shard}}.safetensors", shard=GENERATE_SHARDS
        ),
        reference=expand(
            f"{EVAL_DIR}/reference/shard-{{shard}}.safetensors", shard=REFERENCE_SHARDS
        ),
        code=code("evaluate"),
    output:
        metrics=f"{EVAL_DIR}/metrics.json",
    log:
        log_file("evaluate"),
    benchmark:
        benchmark_file("evaluate")
    conda:
        "../envs/torch.yaml"
    params:
        kid=evaluate_settings("kid_subsets", "kid_subset_size"),
    message:
        "Computing FID, KID and CLIP score of the generated dataset"
    script:
        "../workflow_scripts/evaluate.py"
