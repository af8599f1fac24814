"""Built-in backbone plugin: Qwen2 / Qwen2.5 (biased q/k/v projections, same layer layout as Llama)."""

from ..hookspecs import hookimpl
from .base import LlamaStyleBackbone


class Qwen2Backbone(LlamaStyleBackbone):
    name = "qwen2"
    model_types = ("qwen2",)
    vllm_layer = "vllm.model_executor.models.qwen2:Qwen2DecoderLayer"


@hookimpl
def ouroboros_backbones():
    return [Qwen2Backbone()]
