"""
Whether an object's instance dict has been materialised (issue 19, round
7): in CPython 3.11 an object keeps its attributes in inline values until
its C{__dict__} is read (C{obj.__dict__}, C{vars(obj)}); from then on they
live in a dict, and attribute lookups on it are slower. Observed without
reading C{__dict__} (which would materialise it): the garbage collector's
referents of such an object are its attribute values, or its dict.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

#: Inline values exist from CPython 3.11 (3.12 and 3.13 materialise a dict
#: the same way on a read of __dict__; 3.13 and later may not).
OBSERVABLE = sys.version_info[:2] in ((3, 11), (3, 12))


def dict_materialised(obj: Any, attribute: str) -> bool:
    """
    Whether C{obj}'s attributes are in a dict: its instance attribute
    C{attribute} is not among its referents, but in a dict that is.
    """
    value = getattr(obj, attribute)
    referents = gc.get_referents(obj)
    if any(found is value for found in referents):
        return False
    return any(type(found) is dict and found.get(attribute, found) is value for found in referents)
