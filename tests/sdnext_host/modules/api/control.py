"""modules/api/control.py (SD.Next): POST /sdapi/v1/control. sanitize_args drops
`alwayson_scripts` (among other fields) and renames script_name/script_args to the override
fields; control_run then gets no script arguments, so every always-on script runs with its
UI defaults."""
from ..control import run


def sanitize_args(args: dict) -> dict:
    args = dict(args)
    for key in ('sampler_name', 'alwayson_scripts', 'face', 'save_images'):
        args.pop(key, None)
    args['override_script_name'] = args.pop('script_name', None)
    args['override_script_args'] = args.pop('script_args', None)
    return args


def post_control(req: dict):
    return run.control_run(**sanitize_args(req))
