"""modules/paths.py (SD.Next): the data folder, and where extensions live (a script under
extensions_dir but not extensions_builtin_dir counts as an external extension's)."""
import os

data_path = None
models_path = None
extensions_dir = os.path.join("data", "extensions")
extensions_builtin_dir = "extensions-builtin"
