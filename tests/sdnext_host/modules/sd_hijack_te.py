"""modules/sd_hijack_te.py (SD.Next): the loaders of Flux, Chroma and the other DiT pipelines
(pipelines/model_flux.py, model_chroma.py, …) call init_hijack(pipe), which replaces
`pipe.encode_prompt` by a wrapper with its own cache: up to 16 encodings keyed by the prompt
text alone (a str, or a list of one str stripped of ", \\n"; other prompts are not cached),
cleared only when shared.sd_model changes. The original stays as `pipe.orig_encode_prompt`.
Nothing in the key says which text-encoder weights, negative prompt or batch size made it."""
from . import shared


class PromptCache:
    def __init__(self):
        self.cache, self.id, self.max = {}, None, 16

    def get(self, prompt):
        if self.id != id(shared.sd_model):
            self.cache.clear()
            self.id = id(shared.sd_model)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return self.cache.get(prompt[0])
        if isinstance(prompt, str):
            return self.cache.get(prompt)
        return None

    def set(self, prompt, encoded):
        if len(self.cache) >= self.max:
            del self.cache[next(iter(self.cache))]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            self.cache[prompt[0]] = encoded
        elif isinstance(prompt, str):
            self.cache[prompt] = encoded


prompt_cache = PromptCache()
calls = []  # every call's prompt, for tests


def hijack_encode_prompt(*args, **kwargs):
    args = list(args)
    prompt = kwargs.get("prompt")
    if prompt is None and args:
        prompt = args[0]
    if isinstance(prompt, list):
        prompt = [x.strip(", \n") if isinstance(x, str) else x for x in prompt]
    calls.append(prompt)
    cached = prompt_cache.get(prompt)
    if cached is not None:
        return cached
    encoded = shared.sd_model.orig_encode_prompt(*args, **kwargs)
    prompt_cache.set(prompt, encoded)
    return encoded


def init_hijack(pipe):
    if pipe is not None and not hasattr(pipe, "orig_encode_prompt") \
            and hasattr(pipe, "encode_prompt"):
        pipe.orig_encode_prompt = pipe.encode_prompt
        pipe.encode_prompt = hijack_encode_prompt
