"""Built-in backbone plugin: Llama family (SmolLM2 and others)."""

from ..hookspecs import hookimpl
from .base import LlamaStyleBackbone


class LlamaBackbone(LlamaStyleBackbone):
    name = "llama"
    model_types = ("llama",)


@hookimpl
def ouroboros_backbones():
    return [LlamaBackbone()]
