"""Teach PEFT a new tuner type. PEFT's `register_peft_method` only accepts names already in its closed
`PeftType` enum, so the enum is extended first. Tested against the PEFT range pinned in pyproject."""

from __future__ import annotations

import enum

from peft.utils.peft_types import PeftType, register_peft_method

NAME = "ouroboros"
PREFIX = "ouroboros_"


def extend_peft_type(name: str = NAME) -> PeftType:
    """Add `name.upper()` to `PeftType` (idempotent) and return the member."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, key, member)  # bypass Enum's guard against new attributes
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    assert isinstance(PeftType(key), enum.Enum)
    return member


def register(config_cls, model_cls) -> PeftType:
    """Register the Ouroboros config and tuner with PEFT once per process."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = extend_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not model_cls:
        register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    return peft_type
