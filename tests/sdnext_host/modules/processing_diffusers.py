"""modules/processing_diffusers.py (SD.Next): process_base lives here upstream; the stand-in
keeps it in processing.py. Its presence tells an extension it runs in SD.Next."""
from .processing import process_base, set_pipeline_args  # noqa: F401
