"""Built-in backbone plugin: Llama family (SmolLM2 and others)."""

from ..hookspecs import hookimpl
from .base import LlamaStyleBackbone


class LlamaBackbone(LlamaStyleBackbone):
    name = "llama"
    model_types = ("llama",)
    vllm_layer = "vllm.model_executor.models.llama:LlamaDecoderLayer"


@hookimpl
def ouroboros_backbones():
    return [LlamaBackbone()]
