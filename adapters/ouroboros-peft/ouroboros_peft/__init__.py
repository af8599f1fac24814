"""PEFT integration of Ouroboros: `get_peft_model(model, OuroborosConfig(...))`.

Importing this package registers the `OUROBOROS` PEFT type (PEFT has no plugin autoload: import it before
`PeftModel.from_pretrained`) and the exported `ouroboros` model type with transformers' Auto classes.
"""

from .calibration import calibrate_step_norms
from .config import OuroborosConfig
from .exporting import export
from .layer import OuroborosDecoder
from .model import OuroborosModel
from .modeling import OuroborosForCausalLM, OuroborosLMConfig, register_auto_classes
from .registration import register

register(OuroborosConfig, OuroborosModel)
register_auto_classes()

__all__ = ["calibrate_step_norms", "OuroborosConfig", "OuroborosDecoder", "OuroborosForCausalLM", "OuroborosLMConfig", "OuroborosModel", "export"]

