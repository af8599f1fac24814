"""Backbones tell the core how to drive one host architecture family. See `base.Backbone`."""

from .base import Backbone, LlamaStyleBackbone

__all__ = ["Backbone", "LlamaStyleBackbone"]
