"""Tiny diffusers pipelines with random weights, built offline (no Hub): tokenizers from in-memory vocabularies,
text encoders, denoisers and VAEs from small configs. The VAEs keep the real latent channels, scaling factors and
the 8x spatial factor, since that is what fast decoders care about; everything else is as small as it runs."""
from __future__ import annotations

import string

import torch

from fastdec.latent_spaces import LatentSpace
from fastdec.models.base import LatentDecoder
from fastdec.models.registry import register_architecture
from fastdec.models.tae import TAEConfig, TAEDecoder

LETTERS = list(string.ascii_lowercase)


# ----------------------------------------------------------------------------- tokenizers
def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u0120", "\u010a"] + LETTERS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


# ----------------------------------------------------------------------------- text encoders
def clip_text_encoder(tokenizer, with_projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


# ----------------------------------------------------------------------------- VAEs (real latent spaces, tiny widths)
def kl_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
        latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=shift_factor is None, use_post_quant_conv=shift_factor is None, sample_size=32, **extra,
    )


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=32,
        sample_size=32, mid_block_add_attention=False,
    )
    # non-trivial batch-norm statistics, as in the real checkpoint
    g = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=g) * 0.5)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=g) + 0.5)
    return vae


def svd_vae():
    from diffusers import AutoencoderKLTemporalDecoder

    # its encoder and decoder use 32 norm groups, hence the 32-wide blocks
    return AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=1,
        latent_channels=4,
    )


# ----------------------------------------------------------------------------- pipelines
def sd15_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )
    return StableDiffusionPipeline(
        vae=kl_vae(4, 0.18215), text_encoder=clip_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=kl_vae(4, 0.13025, force_upcast=True), text_encoder=clip_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True), tokenizer_2=tokenizer_2, unet=unet,
        # DDIM, not Euler: with a random UNet, 2 Euler steps leave latents far beyond the decoder's +-3 soft clamp,
        # where every decoder input looks the same and the equivalence test could not see a wrong conversion
        scheduler=DDIMScheduler(clip_sample=False), force_zeros_for_empty_prompt=False,
    )


def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(16, 1.5305, 0.0609),
        text_encoder=clip_text_encoder(tok, with_projection=True), tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok_2, with_projection=True), tokenizer_2=tok_2,
        text_encoder_3=t5_encoder(tok_3), tokenizer_3=tok_3,
    )


def flux1_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok, tok_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(16, 0.3611, 0.1159),
        text_encoder=clip_text_encoder(tok), tokenizer=tok, text_encoder_2=t5_encoder(tok_2), tokenizer_2=tok_2,
        transformer=transformer,
    )


def flux2_klein_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    ))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=True,
    )


def flux2_pipeline():
    """Flux2Pipeline (FLUX.2-dev layout). Its text encoder is Mistral3 behind a PixtralProcessor that cannot be
    built offline, so it runs on given prompt_embeds (a supported call) and has no text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    )
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=None, tokenizer=None,
        transformer=transformer,
    )


def svd_pipeline():
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=4, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=8,
    ))
    feature_extractor = CLIPImageProcessorPil(crop_size=32, size=32)
    return StableVideoDiffusionPipeline(
        vae=svd_vae(), image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


PIPELINES = {
    "sd15": sd15_pipeline, "sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "flux1": flux1_pipeline,
    "flux2": flux2_klein_pipeline, "flux2dev": flux2_pipeline, "svd": svd_pipeline,
}


def tiny_decoder(space: str, seed: int = 0) -> LatentDecoder:
    """tae-64 at test size for a latent space, from the one test factory (``factories.tiny_decoder``)."""
    from factories import tiny_decoder as make

    return make("tae-64", space, seed=seed)


# ----------------------------------------------------------------------------- a test-only video decoder
class MeanMixVideoDecoder(LatentDecoder):
    """(N, T, C, h, w) -> (N, T, 3, H, W): a tae-64 per frame, mixed with the clip's mean frame.

    Frame outputs depend on the other frames of the same clip, so grouping frames into the wrong clips
    changes the result: what the FastVAE video tests need to see. Registered (test-only architecture) so a
    FastVAE holding it can be rebuilt from its config.
    """

    architecture = "test-mean-mix"
    config_class = TAEConfig
    is_video = True

    def __init__(self, config: TAEConfig, latent_space: LatentSpace):
        super().__init__(config, latent_space)
        self.inner = TAEDecoder(config, latent_space)

    @classmethod
    def random(cls, space: str = "svd") -> "MeanMixVideoDecoder":
        frame_decoder = tiny_decoder(space)
        decoder = cls(frame_decoder.config, frame_decoder.latent_space)
        decoder.inner.load_state_dict(frame_decoder.state_dict())
        return decoder.eval()

    def decode_layers(self, z: torch.Tensor) -> torch.Tensor:
        n, t = z.shape[:2]
        frames = self.inner.decode_layers(z.flatten(0, 1)).unflatten(0, (n, t))
        return 0.5 * frames + 0.5 * frames.mean(dim=1, keepdim=True)


register_architecture(MeanMixVideoDecoder)
