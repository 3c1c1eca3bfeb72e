"""Prompt conditioning for SD and SDXL equals what the diffusers pipelines feed their UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pdm_lightning.core.conditioning import (
    PromptEmbeddings,
    added_cond_kwargs,
    encode_prompts,
    sdxl_time_ids,
    tokenize,
    unet_conditioning,
)
from pdm_lightning.tiny_sdxl import build_tiny_sdxl_pipeline

PROMPTS = ["a photo of sks dog", "a red cube on the beach in the snow"]


@pytest.fixture(scope="module")
def sdxl():  # noqa: ANN201
    pipeline = build_tiny_sdxl_pipeline(seed=3)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sdxl_tokenize_pads_each_tokenizer_its_own_way(sdxl) -> None:  # noqa: ANN001
    ids, ids_2 = tokenize((sdxl.tokenizer, sdxl.tokenizer_2), PROMPTS)
    assert ids.shape == ids_2.shape == (2, 77)
    # Same words, different padding: <|endoftext|> for the first tokenizer, "!" for the second (as SDXL's).
    eos, bang = sdxl.tokenizer.eos_token_id, sdxl.tokenizer_2.convert_tokens_to_ids("!")
    assert ids[0, -1] == eos and ids_2[0, -1] == bang and bang != eos
    length = int((ids[0] != eos).sum()) + 1  # words + the end token
    assert torch.equal(ids[0, :length], ids_2[0, :length])


@torch.no_grad()
def test_sdxl_encoding_equals_the_pipelines_encode_prompt(sdxl) -> None:  # noqa: ANN001
    ids = tokenize((sdxl.tokenizer, sdxl.tokenizer_2), PROMPTS)
    ours = encode_prompts((sdxl.text_encoder, sdxl.text_encoder_2), ids)
    embeds, _, pooled, _ = sdxl.encode_prompt(PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False)
    hidden_1 = sdxl.text_encoder.config.hidden_size
    assert ours.encoder_hidden_states.shape == (2, 77, hidden_1 + sdxl.text_encoder_2.config.hidden_size)
    assert ours.pooled.shape == (2, sdxl.text_encoder_2.config.projection_dim) and ours.is_sdxl
    torch.testing.assert_close(ours.encoder_hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    # Penultimate layers, not the last ones: the first encoder's part differs from its last hidden state.
    last = sdxl.text_encoder(ids[0])[0]
    assert (ours.encoder_hidden_states[..., :hidden_1] - last).abs().max() > 1e-3


@torch.no_grad()
def test_unet_call_with_our_conditioning_equals_the_pipelines(sdxl) -> None:  # noqa: ANN001
    calls: list[tuple[dict, torch.Tensor]] = []

    def record(module, args, kwargs, output):  # noqa: ANN001, ANN202
        calls.append(({"args": args, **kwargs}, output[0] if isinstance(output, tuple) else output.sample))

    handle = sdxl.unet.register_forward_hook(record, with_kwargs=True)
    try:  # guidance 1: no classifier-free guidance, one UNet call per step with the prompts alone
        sdxl(PROMPTS, num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="latent")
    finally:
        handle.remove()
    (recorded, expected), = calls
    sample, timestep = recorded["args"][:2] if len(recorded["args"]) >= 2 else (recorded["args"][0], recorded["timestep"])
    ids = tokenize((sdxl.tokenizer, sdxl.tokenizer_2), PROMPTS)
    embeddings = encode_prompts((sdxl.text_encoder, sdxl.text_encoder_2), ids)
    time_ids = torch.stack([sdxl_time_ids((64, 64), (0, 0), (64, 64))] * 2)
    kwargs = unet_conditioning(embeddings, time_ids)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], recorded["added_cond_kwargs"]["time_ids"], rtol=0, atol=0)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], recorded["added_cond_kwargs"]["text_embeds"], rtol=0, atol=0)
    ours = sdxl.unet(sample, timestep, **kwargs).sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # The sizes matter: another crop gives another prediction.
    cropped = sdxl.unet(sample, timestep, **unet_conditioning(embeddings, sdxl_time_ids((80, 96), (8, 16), (64, 64)))).sample
    assert (cropped - expected).abs().max() > 1e-5


@torch.no_grad()
def test_sd_encoding_equals_the_pipelines_encode_prompt(tiny_model_dir) -> None:  # noqa: ANN001
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ids = tokenize((pipeline.tokenizer,), PROMPTS)
    assert len(ids) == 1 and ids[0].shape == (2, 77)
    ours = encode_prompts((pipeline.text_encoder,), ids)
    embeds, _ = pipeline.encode_prompt(PROMPTS, torch.device("cpu"), 1, do_classifier_free_guidance=False)
    assert ours.pooled is None and not ours.is_sdxl
    torch.testing.assert_close(ours.encoder_hidden_states, embeds, rtol=0, atol=0)
    assert unet_conditioning(ours).keys() == {"encoder_hidden_states"}
    assert unet_conditioning(ours, torch.zeros(2, 6)).keys() == {"encoder_hidden_states"}  # SD ignores sizes


def test_time_ids_are_size_crop_target_in_height_width_order() -> None:
    assert sdxl_time_ids((768, 1024), (32, 0), (1024, 1024)).tolist() == [768.0, 1024.0, 32.0, 0.0, 1024.0, 1024.0]
    with pytest.raises(ValueError, match="pairs"):
        sdxl_time_ids((768,), (32, 0), (1024, 1024))


def test_added_cond_kwargs_broadcast_and_check_the_batch() -> None:
    pooled = torch.zeros(3, 4, dtype=torch.float16)
    kwargs = added_cond_kwargs(pooled, sdxl_time_ids((64, 64), (0, 0), (64, 64)))
    assert kwargs["time_ids"].shape == (3, 6) and kwargs["time_ids"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"\(batch, 6\) for 3 prompts"):
        added_cond_kwargs(pooled, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="needs time_ids"):
        unet_conditioning(PromptEmbeddings(torch.zeros(3, 77, 8), pooled))


def test_embeddings_select_and_repeat_together() -> None:
    embeddings = PromptEmbeddings(torch.arange(2.0).view(2, 1, 1), torch.arange(2.0).view(2, 1))
    assert embeddings[1:].pooled.tolist() == [[1.0]] and embeddings[1:].encoder_hidden_states.shape == (1, 1, 1)
    repeated = embeddings.repeat(2)
    assert repeated.pooled.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert repeated.encoder_hidden_states.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_encode_refuses_mismatched_inputs(sdxl) -> None:  # noqa: ANN001
    ids = tokenize((sdxl.tokenizer,), PROMPTS)
    with pytest.raises(ValueError, match="2 text encoders but 1 id tensors"):
        encode_prompts((sdxl.text_encoder, sdxl.text_encoder_2), ids)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        encode_prompts((sdxl.text_encoder, sdxl.text_encoder), ids * 2)
