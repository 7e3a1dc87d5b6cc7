"""The error of a region that cannot be evaluated, apart from regions.py so that what
imports it (the mask store, the tab) needs no torch: the tab is built under each WebUI's
own Gradio, in environments without it."""


class RegionError(ValueError):
    """A region names a mask the store lacks, or a mask that is not an image."""
