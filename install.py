"""Run by the WebUI launcher at every start. The WebUI brings torch, numpy, Pillow and
safetensors; NetWeave needs only lark on top."""
import launch

LARK = "lark==1.3.1"

if not launch.is_installed("lark"):
    launch.run_pip(f"install {LARK}", "lark for NetWeave")
