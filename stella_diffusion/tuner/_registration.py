"""The single place where peft's internals are touched: one new member of the `PeftType` enum.

peft's public `register_peft_method` accepts only names that are members of `PeftType`, and an enum cannot
gain members through a public API. So we add the ``STELLA`` member here, by hand, exactly as `enum` itself
stores members, and register everything else through `register_peft_method`.
"""

from __future__ import annotations

from peft.utils import PeftType


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # the enum metaclass forbids setattr for existing members only
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


STELLA_PEFT_TYPE = _add_peft_type_member("STELLA")
