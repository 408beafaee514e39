"""Orth-Dion and Dion for JAX and Optax.

Orth-Dion (arXiv:2605.16341) is Dion (arXiv:2504.05295) with the right factor
orthonormalized by a sign-safe QR, so that every update is an exact rank-r
partial isometry; ``right_factor="polar"`` takes the exact rank-r polar factor
instead. Both error-feedback forms are offered: the reference mu-form and the
paper's beta-form (``error_feedback``, ``ERROR_FEEDBACK_FORMS``). Public API:

* optimizers: ``orth_dion``, ``dion`` (and where they send each leaf:
  ``routing_summary`` giving a ``RoutingSummary`` of ``LeafRoute``s,
  ``default_param_labels``);
* transformations: ``scale_by_orth_dion``, ``scale_by_error_feedback``,
  ``scale_by_low_rank_orthogonalization`` with ``LowRankCompressor``, and
  their states (``OrthDionState``, ``LowRankState``, ``ReplicaMomenta``,
  ``ScheduleGuardState``); ``STATIC_ARGS`` for ``optax.inject_hyperparams``;
* weights as matrices: ``DionDimensionNumbers``;
* adaptive rank (Ada-Orth-Dion, ``adaptive_rank=True``): ``RankController``
  with its ``RankPolicy``, ``resize_ranks``, ``current_ranks``,
  ``effective_ranks``;
* compressed data parallelism: ``per_replica_value_and_grad``,
  ``average_replica_momenta``, ``average_replicas``;
* diagnostics: ``diagnostics_summary``, ``matrix_diagnostics``
  (``MatrixDiagnostics``); the bytes a
  compiled step moves: the ``communication`` module;
* the sign-safe QR itself: ``orthonormalize``, and the names of its
  methods, ``ORTHOGONALIZE_METHODS`` (the ``orthogonalize`` setting's choices);
  the polar factor: ``polar``; the right factors: ``RIGHT_FACTORS``.

docs/design.md maps the modules behind them.
"""

from orth_dion_jax import communication
from orth_dion_jax.adaptive_rank import RankController
from orth_dion_jax.adaptive_rank import current_ranks
from orth_dion_jax.adaptive_rank import effective_ranks
from orth_dion_jax.adaptive_rank import resize_ranks
from orth_dion_jax.alias import dion
from orth_dion_jax.alias import orth_dion
from orth_dion_jax.alias import routing_summary
from orth_dion_jax.data_parallel import ReplicaMomenta
from orth_dion_jax.data_parallel import average_replica_momenta
from orth_dion_jax.data_parallel import average_replicas
from orth_dion_jax.data_parallel import per_replica_value_and_grad
from orth_dion_jax.diagnostics import MatrixDiagnostics
from orth_dion_jax.diagnostics import diagnostics_summary
from orth_dion_jax.diagnostics import matrix_diagnostics
from orth_dion_jax.matrix_view import DionDimensionNumbers
from orth_dion_jax.nonfinite import ScheduleGuardState
from orth_dion_jax.orthogonalize import METHODS as ORTHOGONALIZE_METHODS
from orth_dion_jax.orthogonalize import orthonormalize
from orth_dion_jax.polar_factor import polar
from orth_dion_jax.routing import LeafRoute
from orth_dion_jax.routing import RoutingSummary
from orth_dion_jax.routing import default_param_labels
from orth_dion_jax.low_rank import RIGHT_FACTORS
from orth_dion_jax.settings import ERROR_FEEDBACK_FORMS
from orth_dion_jax.settings import LowRankCompressor
from orth_dion_jax.settings import RankPolicy
from orth_dion_jax.transform import LowRankState
from orth_dion_jax.transform import OrthDionState
from orth_dion_jax.transform import scale_by_error_feedback
from orth_dion_jax.transform import scale_by_low_rank_orthogonalization
from orth_dion_jax.transform import scale_by_orth_dion
from orth_dion_jax.settings import STATIC_ARGS

__version__ = "0.1.0"

__all__ = [
    "DionDimensionNumbers", "ERROR_FEEDBACK_FORMS", "LeafRoute",
    "ORTHOGONALIZE_METHODS", "RIGHT_FACTORS", "LowRankCompressor", "LowRankState",
    "MatrixDiagnostics", "OrthDionState", "RankController", "RankPolicy",
    "ReplicaMomenta", "RoutingSummary",
    "STATIC_ARGS", "ScheduleGuardState", "average_replica_momenta",
    "average_replicas", "communication", "current_ranks",
    "default_param_labels", "effective_ranks",
    "diagnostics_summary", "dion", "matrix_diagnostics", "orth_dion",
    "orthonormalize", "per_replica_value_and_grad", "polar", "resize_ranks", "routing_summary",
    "scale_by_error_feedback", "scale_by_low_rank_orthogonalization",
    "scale_by_orth_dion",
]
