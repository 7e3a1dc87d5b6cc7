data_path = None
models_path = None
