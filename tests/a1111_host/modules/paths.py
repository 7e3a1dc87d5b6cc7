"""modules/paths.py: where models and user data live."""
data_path = None
models_path = None
