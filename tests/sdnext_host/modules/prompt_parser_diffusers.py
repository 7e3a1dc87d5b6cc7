"""modules/prompt_parser_diffusers.py (SD.Next): the prompt-embedding cache. `cache` is a
module OrderedDict; PromptEmbedder.checkcache keys it by the text of [the tag-stripped prompts,
the negative prompts, the batch size, clip skip, steps, the `.items` of every entry of
p.network_data, apply_te (p.lora_apply_te, else opts.lora_apply_te)], is read before encoding
and written after, holds opts.sd_textencoder_cache_size entries (0: off) and drops the oldest.
Nothing in the key says whose text-encoder weights encoded the prompt.

Flux (get_weighted_text_embeddings): each prompt alone through `pipe.encode_prompt(prompt=,
prompt_2=, device=, num_images_per_prompt=1)` — which is sd_hijack_te's cached wrapper on a
Flux pipeline — for T5's embeddings and CLIP's pooled vector; no negative ("no negative
support"), so processing hands the pipeline the negative prompt as text. SD3
(get_weighted_text_embeddings_sd3, which runs the three text encoders itself): the prompt's and
the negative prompt's embeddings and pooled vectors, here from the pipeline's own encode_prompt
(not sd_hijack_te's wrapper, which SD.Next's SD3 loader installs). Chroma, Z-Image, Qwen-Image
and Wan never come here (processing_prompt.set_prompt leaves them to the pipeline)."""
from collections import OrderedDict

from . import shared

cache = OrderedDict()


def cache_key(p, prompts, negative_prompts, steps):
    en_data = [params.items for entry in p.network_data.values() for params in entry]
    apply_te = getattr(p, 'lora_apply_te', None)
    if apply_te is None:
        apply_te = shared.opts.lora_apply_te
    return str([prompts, negative_prompts, len(prompts), p.clip_skip, steps, en_data, apply_te])


def encode(pipe, p, prompts, negative_prompts, steps, cfg):
    """{'prompt_embeds', 'negative_prompt_embeds', 'pooled', 'negative_pooled'} for the batch,
    from the cache when the key is there (upstream: PromptEmbedder, per prompt; here, for SD,
    the pipeline's encode_prompt on the whole batch)."""
    size = int(shared.opts.sd_textencoder_cache_size)
    key = cache_key(p, prompts, negative_prompts, steps)
    if size > 0 and key in cache:
        cache.move_to_end(key)
        return cache[key]
    import torch
    with torch.no_grad():
        if 'Flux' in type(pipe).__name__:
            each = [pipe.encode_prompt(prompt=x.strip(), prompt_2=x.strip() or " ", device="cpu",
                                       num_images_per_prompt=1) for x in prompts]
            embeds = {'prompt_embeds': torch.cat([e[0] for e in each]),
                      'pooled': torch.cat([e[1] for e in each]),
                      'negative_prompt_embeds': None, 'negative_pooled': None}
        elif 'StableDiffusion3' in type(pipe).__name__:
            encode = getattr(pipe, 'orig_encode_prompt', pipe.encode_prompt)
            e = encode(prompt=prompts[0], prompt_2=None, prompt_3=None, device="cpu",
                       num_images_per_prompt=len(prompts), do_classifier_free_guidance=True,
                       negative_prompt=negative_prompts[0])
            embeds = {'prompt_embeds': e[0], 'negative_prompt_embeds': e[1], 'pooled': e[2],
                      'negative_pooled': e[3]}
        else:
            encoded = pipe.encode_prompt(prompt=prompts[0], device="cpu",
                                         num_images_per_prompt=len(prompts),
                                         do_classifier_free_guidance=cfg,
                                         negative_prompt=negative_prompts[0])
            embeds = {'prompt_embeds': encoded[0], 'negative_prompt_embeds': encoded[1],
                      'pooled': None, 'negative_pooled': None}
    if size > 0:
        cache[key] = embeds
        while len(cache) > size:
            cache.popitem(last=False)
    return embeds
