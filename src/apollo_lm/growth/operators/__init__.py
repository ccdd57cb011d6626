"""Growth operators on the whole training state (name-keyed weights, AdamW moments, model config).

* :mod:`.staged`: width x2 and depth x2 of staged training (Shen et al. 2022);
* :mod:`.bert2bert`: FPI / AKI width expansion and stacking depth (Chen et al. 2022);
* :mod:`.ligo`: the learned linear growth operator (Wang et al. 2023).

Operators read a model family only through its :class:`~.adapter.FamilyAdapter` (parameter-name patterns);
nothing here imports a model file.
"""

from __future__ import annotations

from .adapter import ADAPTERS, FamilyAdapter, GrowthResult, ParamSpec, adapter_for, register_adapter

__all__ = ["ADAPTERS", "FamilyAdapter", "GrowthResult", "ParamSpec", "adapter_for", "register_adapter"]
