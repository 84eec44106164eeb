"""The table methods are looked up in (docs/method.md section 8).

Kept free of imports so that ``QuantConfig`` can check ``method`` against it while ``tfmq.quant.recipes``
(which validates recipes against the layer policies of the config) fills it: no import cycle. The
built-in methods are registered by ``tfmq.quant.methods``, which the package imports first.
"""
from __future__ import annotations

from typing import Any

#: method name -> ``tfmq.Recipe``; filled by ``tfmq.register_recipe``
RECIPES: dict[str, Any] = {}
