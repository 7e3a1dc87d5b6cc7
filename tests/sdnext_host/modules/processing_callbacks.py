"""modules/processing_callbacks.py (SD.Next): the pipeline's step-end callback."""
from . import shared

calls = []


def diffusers_callback(pipe, step: int = 0, timestep: int = 0, kwargs: dict = None):
    kwargs = kwargs or {}
    if shared.state.interrupted:
        raise AssertionError("Interrupted...")
    shared.state.step()
    calls.append(step)
    return kwargs
