"""modules/script_callbacks.py (Neo): A1111 v1.10's; `cfg_denoiser_callback` reports a
callback's exception and sampling goes on."""
from . import same_as

same_as("a1111_host", "script_callbacks", globals())
