"""Tiny diffusers pipelines of the newer transformer families, built from the real classes
(ZImagePipeline, QwenImagePipeline, StableDiffusion3Pipeline, WanPipeline with one or two
experts) over tinydits' transformers and tiny text encoders, VAEs and schedulers, saved as
folders the way a user's download is. Tokenizers are built offline (extension/tokenizer.py:
a closed vocabulary; Z-Image's gets a chat template, which ZImagePipeline applies)."""
import torch

from tinydits import (QWEN_TEXT, SD3_POOLED, SD3_TEXT, WAN_TEXT, ZIMAGE_CAP, qwen_transformer,
                      sd3_transformer, wan_transformer, zimage_transformer)

WORDS = "a an red blue green square circle triangle on white black background".split()
# A chat template that keeps the message alone: the tiny vocabulary would spend a short
# caption's tokens on Qwen3's role markers, spelt letter by letter
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
FAMILIES = ("zimage", "qwenimage", "sd3", "wan22")


def tokenizer(length):
    from netweave.extension.tokenizer import t5_tokenizer
    return t5_tokenizer(WORDS, max_length=length)


def flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(**kw)


def sd_vae(latent=4):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, layers_per_block=1,
                         block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.1,
                         scaling_factor=1.5)


def zimage_pipeline():
    from diffusers import ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model
    tok = tokenizer(16)  # caption and picture positions within the tiny model's rope tables
    tok.chat_template = CHAT
    torch.manual_seed(0)
    text = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=ZIMAGE_CAP, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=12, max_position_embeddings=64))
    return ZImagePipeline(scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=True),
                          vae=sd_vae(), text_encoder=text, tokenizer=tok,
                          transformer=zimage_transformer())


def qwen_pipeline():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tok = tokenizer(1024)  # the pipeline drops its template's first 34 tokens
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=QWEN_TEXT, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, rope_scaling={"type": "mrope",
                                                                    "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=QWEN_TEXT, fullatt_block_indexes=[0]),
        vocab_size=len(tok), hidden_size=QWEN_TEXT)
    text = Qwen2_5_VLForConditionalGeneration(config)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=True),
                             vae=vae, text_encoder=text, tokenizer=tok,
                             transformer=qwen_transformer())


def sd3_pipeline(layout="sd3.5-medium"):
    """CLIP-L (8 wide) and CLIP-G (16) side by side make T5's 24; their projections (6 + 6)
    the transformer's pooled vector; the transformer in one of tinydits.SD3_LAYOUTS."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from netweave.extension.tokenizer import clip_tokenizer

    def clip(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=SD3_POOLED // 2,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    torch.manual_seed(0)
    t5_tok = tokenizer(16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=SD3_TEXT, d_kv=8, d_ff=32,
                                 num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False))
    return StableDiffusion3Pipeline(
        scheduler=flow_scheduler(shift=3.0), vae=sd_vae(), text_encoder=clip(8),
        tokenizer=clip_tokenizer(), text_encoder_2=clip(16), tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=t5, tokenizer_3=t5_tok, transformer=sd3_transformer(layout))


def wan_pipeline(experts=2):
    """Wan 2.2 A14B's layout: umT5, the Wan VAE, UniPC in flow mode, a high-noise
    `transformer` and a low-noise `transformer_2` (another seed) switching at 0.875."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel
    tok = tokenizer(16)
    torch.manual_seed(0)
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=WAN_TEXT, d_kv=8, d_ff=32,
                                       num_layers=2, num_heads=2, is_encoder_decoder=False))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    second = None
    if experts == 2:
        second = wan_transformer()
        with torch.no_grad():  # another expert: other weights
            g = torch.Generator().manual_seed(9)
            for p in second.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, scheduler=scheduler,
                       transformer=wan_transformer(), transformer_2=second,
                       boundary_ratio=0.875 if experts == 2 else None)


BUILD = {"zimage": zimage_pipeline, "qwenimage": qwen_pipeline, "sd3": sd3_pipeline,
         "wan22": wan_pipeline}


def write_pipeline(folder, arch, **kw):
    """The family's tiny pipeline saved as a diffusers folder (`kw`: its builder's, e.g. an
    SD3 layout)."""
    pipe = BUILD[arch](**kw)
    pipe.save_pretrained(str(folder))
    return folder
