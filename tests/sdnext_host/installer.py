"""installer.py (SD.Next, a top-level module): the titles of the extension scripts the Control
tab runs. modules/scripts_manager imports this list object by name, so an addition made before
the Control runner initialises is seen there."""
control_extensions = [  # extensions marked as safe for the control ui
    'NudeNet',
    'IP Adapters',
    'Remove background',
]
