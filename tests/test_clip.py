"""CLIP text encoders and prompt encoding against transformers and diffusers (CPU, tiny)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from sdxl.models.clip import (
    IGNORED_KEYS,
    CLIPTextModel,
    convert_transformers_state_dict,
)
from sdxl.models.configs import SCHEDULER, SDXL_BASE, TINY, CLIPTextConfig
from sdxl.text import MAX_LENGTH, encode_prompts, load_tokenizers, tokenize
from sdxl.tiny_tokenizer import END, write_tokenizer

ENCODERS = ("text_encoder", "text_encoder_2")
HF_CLASSES = {
    "text_encoder": transformers.CLIPTextModel,
    "text_encoder_2": transformers.CLIPTextModelWithProjection,
}
PROMPTS = ["a red cat", "", "a photo of a small dog sitting on the beach at sunset, oil painting"]
LONG_PROMPT = "a photo of a red cat on a blue chair " * 12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_encoder(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A transformers text encoder with seeded, perturbed weights (LayerNorms not at identity)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig.from_dict({**TINY[name], **overrides})
    model = HF_CLASSES[name](cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def ours_from(hf: transformers.PreTrainedModel, name: str, **overrides) -> CLIPTextModel:
    """Our encoder built on meta and loaded strictly from the transformers weights."""
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_dict({**TINY[name], **overrides}))
    model.load_state_dict(
        convert_transformers_state_dict(hf.state_dict()), strict=True, assign=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    write_tokenizer(folder / "tokenizer", pad_token=END)
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    return load_tokenizers(folder)


@pytest.mark.parametrize("eos_token_id", [2, 999])  # legacy argmax rule and first-EOS rule
@pytest.mark.parametrize("name", ENCODERS)
def test_matches_transformers(name, eos_token_id, tokenizers):
    # tokenizer pads with EOS, tokenizer_2 with "!": SDXL feeds both paddings to both encoders
    ids = torch.cat([tokenize(tok, PROMPTS) for tok in tokenizers])  # (6, 77), 3 lengths each
    assert tokenizers[0].eos_token_id == tokenizers[1].eos_token_id == 999
    hf = hf_encoder(name, eos_token_id=eos_token_id)
    ours = ours_from(hf, name, eos_token_id=eos_token_id)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        ref_pooled = ref.text_embeds if name == "text_encoder_2" else ref.pooler_output
        for skip in (0, 1, 2):
            hidden, pooled = ours(ids, skip=skip)
            assert hidden.shape == (6, MAX_LENGTH, 32)
            for k in range(6):  # per row, so one padding convention cannot hide behind the other
                assert rel_err(hidden[k], ref.hidden_states[-(skip + 1)][k]) < 1e-4
                assert rel_err(pooled[k], ref_pooled[k]) < 1e-4


def test_pooled_picks_eos_position():
    """Changing a token after EOS must not change pooled; changing the EOS token's context must."""
    hf = hf_encoder("text_encoder_2")
    ours = ours_from(hf, "text_encoder_2")
    ids = torch.tensor([[998, 5, 6, 999] + [0] * 73])
    after = ids.clone()
    after[0, 10] = 7
    before = ids.clone()
    before[0, 2] = 7
    with torch.no_grad():
        p, p_after, p_before = (ours(x)[1] for x in (ids, after, before))
    torch.testing.assert_close(p_after, p, rtol=0, atol=0)
    assert (p_before - p).abs().max() > 1e-3


@pytest.mark.parametrize("name", ENCODERS)
def test_full_size_matches_transformers_on_meta(name):
    with torch.device("meta"):
        ref = HF_CLASSES[name](transformers.CLIPTextConfig.from_dict(SDXL_BASE[name]))
        ours = CLIPTextModel(CLIPTextConfig.from_dict(SDXL_BASE[name]))
    ref_sd = convert_transformers_state_dict(ref.state_dict())
    ours_sd = ours.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}[name]
    assert ("text_projection.weight" in ours_sd) == (name == "text_encoder_2")
    assert not list(ours.buffers())


def test_convert_state_dict_prefix_and_ignored_keys():
    hf = hf_encoder("text_encoder")
    sd = hf.state_dict()
    assert "embeddings.token_embedding.weight" in sd  # transformers >= 5 saves no prefix
    prefixed = {f"text_model.{k}": v for k, v in sd.items()}
    prefixed[IGNORED_KEYS[0]] = torch.arange(77)[None]  # what old SDXL checkpoints carry
    converted = convert_transformers_state_dict(prefixed)
    assert converted.keys() == convert_transformers_state_dict(sd).keys()
    CLIPTextModel(CLIPTextConfig.from_dict(TINY["text_encoder"])).load_state_dict(converted)


def test_load_tokenizers_missing_folder(tmp_path):
    write_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        load_tokenizers(tmp_path)


def test_tokenize_pads_with_each_tokenizers_pad(tokenizers):
    ids1, ids2 = (tokenize(t, ["a cat"]) for t in tokenizers)
    assert ids1.shape == ids2.shape == (1, MAX_LENGTH)
    assert ids1.dtype == torch.long
    n = int((ids1[0] != 999).sum()) + 1  # BOS, tokens, EOS
    assert torch.equal(ids1[0, :n], ids2[0, :n])
    assert ids1[0, n:].eq(999).all() and ids2[0, n:].eq(tokenizers[1].pad_token_id).all()


def test_long_prompt_warns_and_encodes(tokenizers, caplog):
    full = tokenizers[0](LONG_PROMPT).input_ids
    n_dropped = len(full) - MAX_LENGTH
    assert n_dropped > 0
    dropped_text = tokenizers[0].decode(full[MAX_LENGTH - 1 : -1])
    encoders = tuple(ours_from(hf_encoder(n), n) for n in ENCODERS)
    with caplog.at_level(logging.WARNING, logger="sdxl.text"):
        embeds, pooled = encode_prompts(tokenizers, encoders, ["a cat", LONG_PROMPT])
    records = [r for r in caplog.records if r.name == "sdxl.text"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "truncated" in message and f"{n_dropped} tokens dropped" in message
    assert dropped_text in message and "prompt 1" in message and "prompt 0" not in message
    assert embeds.shape == (2, MAX_LENGTH, 64) and pooled.shape == (2, 32)
    assert torch.isfinite(embeds).all()


def test_encode_prompts_matches_diffusers(tokenizers):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    hf = [hf_encoder(n, seed=k) for k, n in enumerate(ENCODERS)]
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(TINY["vae"]),
        text_encoder=hf[0],
        text_encoder_2=hf[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel.from_config(TINY["unet"]),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        add_watermarker=False,
    )
    prompts = [*PROMPTS, LONG_PROMPT]
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        prompts, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    ours = tuple(ours_from(m, n) for m, n in zip(hf, ENCODERS, strict=True))
    embeds, pooled = encode_prompts(tokenizers, ours, prompts)
    assert embeds.shape == ref_embeds.shape == (4, MAX_LENGTH, 64)
    assert pooled.shape == ref_pooled.shape == (4, 32)
    assert rel_err(embeds, ref_embeds) < 1e-4
    assert rel_err(pooled, ref_pooled) < 1e-4
    for k in range(4):  # per prompt too, so one prompt cannot hide behind the others
        assert rel_err(embeds[k], ref_embeds[k]) < 1e-4
        assert rel_err(pooled[k], ref_pooled[k]) < 1e-4
    assert not embeds.requires_grad


def test_encode_prompts_follows_encoder_dtype(tokenizers):
    encoders = tuple(ours_from(hf_encoder(n), n).to(torch.bfloat16) for n in ENCODERS)
    embeds, pooled = encode_prompts(tokenizers, encoders, PROMPTS)
    assert embeds.dtype == pooled.dtype == torch.bfloat16
