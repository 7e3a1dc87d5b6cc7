"""modules/prompt_parser.py (Neo keeps A1111 v1.10's)."""
from . import same_as

same_as("a1111_host", "prompt_parser", globals())
