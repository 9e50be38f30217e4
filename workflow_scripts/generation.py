"""The GenerateConfig of the generate and assemble jobs (apart from common.py, which every job
imports: the generation code is then a code input of these jobs only)."""


def generation_config(settings: dict, inputs, output_dir, count: int, index_width: int,
                      device: str = "cpu", code_version: str = "", speed: dict | None = None):  # fmt: skip
    """The GenerateConfig of config.yaml's `generate` section for images 0..count-1.

    settings: generation_settings() of the workflow; speed: compile and channels_last.
    """
    from sdxl.generate.prompts import load_prompts
    from sdxl.generate.run import GenerateConfig

    hp = dict(settings)
    del hp["prompts_file"]  # the file is an input
    prompts, sources = load_prompts(inputs.prompts, count, shuffle=hp.pop("shuffle_prompts"),
                                    seed=hp["seed"], coco_captions=hp["coco_captions"],
                                    flag="generate.prompts_file",
                                    mode_flag="generate.coco_captions")  # fmt: skip
    return GenerateConfig(
        pretrained_model=str(inputs.model),
        output_dir=str(output_dir),
        prompts=tuple(prompts),
        prompt_sources=tuple(sources),
        loras=((str(inputs.lora), hp.pop("lora_scale")),),
        merge_loras=hp.pop("merge_lora"),
        device=device,
        output_format="coco",
        index_width=index_width,
        code_version=code_version,
        **hp,
        **(speed or {}),
    )
