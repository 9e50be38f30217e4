"""The four SDXL networks by component name, for what loads a whole model (the pipeline, a
single-file conversion). A job that needs one network imports only its module, so that its
code inputs (derived from imports) hold only that network's code.
"""

from sdxl.models.clip import CLIPTextModel
from sdxl.models.unet import UNet2DConditionModel
from sdxl.models.vae import AutoencoderKL

MODEL_CLASSES = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModel,
}
