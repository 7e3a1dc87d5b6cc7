"""modules/sd_models.py at Forge dfdcbab: `model_data.get_sd_model()` (sd_forge_lora reads it)."""
from . import shared


class ModelData:
    def get_sd_model(self):
        return shared.sd_model


model_data = ModelData()
