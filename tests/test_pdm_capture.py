"""The PDM query hook under LoRA, and the switch that turns the student's UNet back into its base model."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from pdm_lightning.training.lora import LoraSettings, add_lora_adapters
from pdm_lightning.pdm import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled
from pdm_lightning.pdm.capture import resolve_layer


@pytest.fixture
def unet_and_inputs(tiny_model_dir):  # noqa: ANN001, ANN201
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
              torch.randn(2, 77, 32, generator=generator))
    return unet, inputs


def base_query(unet: UNet2DConditionModel, inputs: tuple) -> torch.Tensor:
    with QueryCapture(unet) as capture, torch.no_grad():
        unet(*inputs)
        return capture.pop()


def test_hook_after_lora_injection_includes_the_adapter_delta(unet_and_inputs) -> None:  # noqa: ANN001
    unet, inputs = unet_and_inputs
    expected_base = base_query(unet, inputs)
    assert expected_base.shape == (2, 64, 32)
    early = QueryCapture(unet)  # taken BEFORE injection: ends up on the wrapped base Linear
    add_lora_adapters(unet, LoraSettings(rank=4, init_lora_weights=False), ["to_q", "to_k", "to_v", "to_out.0"])
    late = QueryCapture(unet)  # taken after injection: on peft's LoRA wrapper
    assert late.module is not early.module and early.module is unet.get_submodule(DEFAULT_PDM_LAYER + ".base_layer")

    layer_inputs: list[torch.Tensor] = []
    late.module.register_forward_hook(lambda module, args, output: layer_inputs.append(args[0]))
    student = unet(*inputs).sample
    with_delta, without_delta = late.pop(), early.pop()
    # The late hook sees W x + scale * B A x; the early one only W x (of the same input x).
    wrapper = late.module
    lora_delta = wrapper.lora_B["default"](wrapper.lora_A["default"](layer_inputs[-1])) * wrapper.scaling["default"]
    assert lora_delta.abs().max() > 1e-3  # B != 0: the adapter changes the query
    torch.testing.assert_close(with_delta, without_delta + lora_delta, rtol=1e-5, atol=1e-5)
    assert (with_delta - without_delta).abs().max() > 1e-3
    assert with_delta.requires_grad  # the student's query backpropagates into the adapters

    # The teacher between the student's forward and backward: base model's query, adapters restored.
    with adapters_disabled(unet):
        torch.testing.assert_close(base_query(unet, inputs), expected_base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_query(unet, inputs), with_delta.detach(), rtol=1e-5, atol=1e-6)
    (with_delta.square().mean() + student.mean()).backward()
    lora_grads = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
    assert lora_grads and all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
    assert all(g is not None for g in lora_grads)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    early.remove(), late.remove()


def test_adapters_disabled_restores_state_after_an_error_and_ignores_plain_models(unet_and_inputs) -> None:  # noqa: ANN001
    unet, inputs = unet_and_inputs
    plain = base_query(unet, inputs)
    with adapters_disabled(unet):  # no adapters: nothing to switch
        torch.testing.assert_close(base_query(unet, inputs), plain)
    add_lora_adapters(unet, LoraSettings(rank=2, init_lora_weights=False), ["to_q"])
    adapted = base_query(unet, inputs)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(unet):
        raise RuntimeError("boom")
    torch.testing.assert_close(base_query(unet, inputs), adapted)


def test_capture_errors_name_the_layer(unet_and_inputs) -> None:  # noqa: ANN001
    unet, _ = unet_and_inputs
    with pytest.raises(ValueError, match="up_blocks.9.*attn1.to_q"):
        resolve_layer(unet, "up_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q")
    with QueryCapture(unet) as capture, pytest.raises(RuntimeError, match="No forward pass"):
        capture.pop()


# SD1.5's UNet structure (stable-diffusion-v1-5 unet/config.json; the keys the PDM layer rule reads, and the sizes).
SD15_UNET_CONFIG = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
}
SDXL_PDM_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"


def test_default_layer_rule_gives_the_papers_layer_for_sd15_and_its_analogue_for_sdxl() -> None:
    from pdm_lightning.pdm.capture import default_pdm_layer, default_pdm_layer_for_config
    from pdm_lightning.tiny_sdxl import SDXL_UNET_CONFIG

    with torch.device("meta"):
        sd15, sdxl = UNet2DConditionModel(**SD15_UNET_CONFIG), UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert default_pdm_layer(sd15) == default_pdm_layer_for_config(sd15.config) == DEFAULT_PDM_LAYER
    assert default_pdm_layer(sdxl) == default_pdm_layer_for_config(sdxl.config) == SDXL_PDM_LAYER
    # SDXL's layer: 640 channels at 1/16 of the image (64 x 64 latent tokens at 1024 px), 10 heads of 64.
    assert sdxl.get_submodule(SDXL_PDM_LAYER).in_features == 640


def test_default_layer_rule_on_the_tiny_models(tiny_model_dir) -> None:  # noqa: ANN001
    from pdm_lightning.pdm.capture import default_pdm_layer, default_pdm_layer_for_config
    from pdm_lightning.tiny_sdxl import build_tiny_sdxl_pipeline

    sd = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    assert default_pdm_layer(sd) == default_pdm_layer_for_config(sd.config) == DEFAULT_PDM_LAYER
    sdxl = build_tiny_sdxl_pipeline().unet
    assert default_pdm_layer(sdxl) == default_pdm_layer_for_config(sdxl.config) == SDXL_PDM_LAYER
    # Per-level layers_per_block: the up path reverses it (up block 1 mirrors down block 1).
    config = {**SD15_UNET_CONFIG, "layers_per_block": [1, 2, 3, 1]}
    with torch.device("meta"):
        uneven = UNet2DConditionModel(**config)
    assert default_pdm_layer(uneven) == default_pdm_layer_for_config(config) == "up_blocks.3.attentions.1.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match="no up block with attention"):
        default_pdm_layer_for_config({**SD15_UNET_CONFIG, "up_block_types": ["UpBlock2D"] * 4})


def test_capture_without_a_layer_uses_the_models_own(tiny_model_dir) -> None:  # noqa: ANN001
    from pdm_lightning.core.conditioning import encode_prompts, sdxl_time_ids, tokenize, unet_conditioning
    from pdm_lightning.tiny_sdxl import build_tiny_sdxl_pipeline

    pipeline = build_tiny_sdxl_pipeline()
    embeddings = encode_prompts((pipeline.text_encoder, pipeline.text_encoder_2),
                                tokenize((pipeline.tokenizer, pipeline.tokenizer_2), ["a photo of sks dog"]))
    with QueryCapture(pipeline.unet, None) as capture, torch.no_grad():
        assert capture.layer == SDXL_PDM_LAYER
        pipeline.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]),
                      **unet_conditioning(embeddings, sdxl_time_ids((64, 64), (0, 0), (64, 64))))
        # Up block 1 of 3 works at half the latent size: 4 x 4 tokens of 64 channels.
        assert capture.pop().shape == (1, 16, 64)
