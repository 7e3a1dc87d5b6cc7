"""backend/args.py (Neo): `dynamic_args`, class-level flags the loader and the UI set.
`online_lora` is the "LoRA in fp16 / on the fly" choice (a GGUF checkpoint forces it on);
`ops` names the layer classes in use ("Mixed…" turns online LoRA off)."""


class dynamic_args:  # noqa: N801 (Neo's name)
    online_lora = False
    ops = ""
    nunchaku = False
