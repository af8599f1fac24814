"""PEFT integration of Ouroboros: `get_peft_model(model, OuroborosConfig(...))`.

Importing this package registers the `OUROBOROS` PEFT type (PEFT has no plugin autoload: import it before
`PeftModel.from_pretrained`).
"""

from .config import OuroborosConfig
from .layer import OuroborosDecoder
from .model import OuroborosModel
from .registration import register

register(OuroborosConfig, OuroborosModel)

__all__ = ["OuroborosConfig", "OuroborosDecoder", "OuroborosModel"]
