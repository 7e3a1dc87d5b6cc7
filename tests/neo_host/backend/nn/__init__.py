"""backend/nn (Neo): the networks Neo builds itself, ComfyUI-style (its text encoders among
them), here in the module trees and names Neo holds, small."""
