"""modules/script_callbacks.py (v1.10.1): the callbacks NetWeave registers."""
import traceback
from collections import defaultdict

callback_map = defaultdict(list)
errors = []


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond,
                 text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def _add(category, callback):
    callback_map[category].append(callback)


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback)


def on_app_started(callback, *, name=None):
    _add("app_started", callback)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback)


def on_ui_tabs(callback, *, name=None):
    _add("ui_tabs", callback)


def ui_settings_callback():
    for c in callback_map["ui_settings"]:
        c()


def ui_tabs_callback():
    tabs = []
    for c in callback_map["ui_tabs"]:
        tabs += c() or []
    return tabs


def _report(category):
    errors.append((category, traceback.format_exc()))  # like report_exception: sampling goes on


def cfg_denoiser_callback(params):
    for c in callback_map["cfg_denoiser"]:
        try:
            c(params)
        except Exception:
            _report("cfg_denoiser")


def app_started_callback(demo, app):
    for c in callback_map["app_started"]:
        try:
            c(demo, app)
        except Exception:
            _report("app_started")


def before_ui_callback():
    for c in reversed(callback_map["before_ui"]):
        try:
            c()
        except Exception:
            _report("before_ui")


def script_unloaded_callback():
    for c in reversed(callback_map["script_unloaded"]):
        try:
            c()
        except Exception:
            _report("script_unloaded")


def clear_callbacks():
    callback_map.clear()
    errors.clear()
