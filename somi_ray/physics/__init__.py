"""Physics of a SOMI Part: graph Laplacian, temporal field, settling, stress and mass."""

from somi_ray.physics.field import temporal_field
from somi_ray.physics.laplacian import normalized_laplacian, project_constraints, random_graph
from somi_ray.physics.settle import SettleOperator, settle

__all__ = [
    "SettleOperator",
    "normalized_laplacian",
    "project_constraints",
    "random_graph",
    "settle",
    "temporal_field",
]
