"""NetWeave: every LoRA tag dialect, compiled into one plan, applied in one forward.

Imported only as the package `netweave` (docs/design.md §1); internal imports are relative.
"""
__version__ = "0.1.0"
