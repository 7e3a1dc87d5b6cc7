"""modules/script_callbacks.py (SD.Next): on_cfg_denoiser registers but is never fired."""
from collections import defaultdict

callback_map = defaultdict(list)


def on_app_started(callback):
    callback_map["app_started"].append(callback)


def on_before_ui(callback):
    callback_map["before_ui"].append(callback)


def on_script_unloaded(callback):
    callback_map["script_unloaded"].append(callback)


def on_ui_settings(callback):
    callback_map["ui_settings"].append(callback)


def on_ui_tabs(callback):
    callback_map["ui_tabs"].append(callback)


def ui_settings_callback():
    for c in callback_map["ui_settings"]:
        c()


def ui_tabs_callback():
    tabs = []
    for c in callback_map["ui_tabs"]:
        tabs += c() or []
    return tabs


def on_cfg_denoiser(callback):
    callback_map["cfg_denoiser"].append(callback)  # nothing calls these on SD.Next


def app_started_callback(demo, app):
    for c in callback_map["app_started"]:
        c(demo, app)


def before_ui_callback():
    for c in reversed(callback_map["before_ui"]):
        c()
