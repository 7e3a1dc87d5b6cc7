"""A1111's infotext parameter line (modules/infotext_utils.py, v1.10.1), which Forge keeps:
what the A1111 and Forge stand-ins' create_infotext write."""
import json


def quote(value) -> str:
    """A value with `,`, `:` or a line break is JSON-quoted (`Lora hashes: "a: 0123…"`)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, index) -> str:
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "Seed": p.seeds[index],
              **p.extra_generation_params}
    return p.prompts[index] + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in params.items()
                                                if v is not None)
