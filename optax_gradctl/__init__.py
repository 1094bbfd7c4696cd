"""optax_gradctl: gradient control for Optax that stays correct when gradients explode.

Four composable :class:`optax.GradientTransformation` s (value clipping,
norm clipping, unit rescaling and z-score normalization) that are exact over
the whole float range and record their statistics in their state.
"""

from optax_gradctl._clipping import clip_by_global_norm as clip_by_global_norm
from optax_gradctl._clipping import clip_by_norm as clip_by_norm
from optax_gradctl._clipping import clip_by_value as clip_by_value
from optax_gradctl._normalizing import unit_rescale as unit_rescale
from optax_gradctl._normalizing import zscore as zscore
from optax_gradctl._reduce import global_norm as global_norm
from optax_gradctl._stats import ClipByGlobalNormState as ClipByGlobalNormState
from optax_gradctl._stats import ClipByNormState as ClipByNormState
from optax_gradctl._stats import ClipByValueState as ClipByValueState
from optax_gradctl._stats import UnitRescaleState as UnitRescaleState
from optax_gradctl._stats import ZScoreLeafState as ZScoreLeafState
from optax_gradctl._stats import ZScoreState as ZScoreState
from optax_gradctl._stats import stats as stats

__version__ = "0.1.0"

__all__ = (
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "UnitRescaleState",
  "ZScoreLeafState",
  "ZScoreState",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "global_norm",
  "stats",
  "unit_rescale",
  "zscore",
)
