"""The embedded demo: a tiny Stable-Diffusion-architecture model trained on coloured shapes,
and LoRAs trained on it whose effects are easy to see and to measure (see README.md here)."""
