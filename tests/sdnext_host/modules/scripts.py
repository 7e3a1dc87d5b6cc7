"""modules/scripts.py (SD.Next): kept for extensions that import it; re-exports scripts_manager."""
from .scripts_manager import AlwaysVisible, Script, ScriptRunner  # noqa: F401
