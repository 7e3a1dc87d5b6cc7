"""modules/prompt_parser.py (Forge 2 keeps A1111 v1.10's)."""
from . import same_as_a1111

same_as_a1111("prompt_parser", globals())
