"""Complexity (params, MAdds), memory (paper section 5.1) and manifold (paper Figure 1) analyses."""

from .complexity import LayerProfile, count_madds, count_params, profile_layers

__all__ = ["LayerProfile", "count_madds", "count_params", "profile_layers"]
