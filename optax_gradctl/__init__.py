"""optax_gradctl: gradient control for Optax that stays correct when gradients explode.

Four composable :class:`optax.GradientTransformation` s (value clipping,
norm clipping, unit rescaling and z-score normalization) that are exact over
the whole float range and record their statistics in their state.
"""

from optax_gradctl._adaptive import AutoClipState as AutoClipState
from optax_gradctl._adaptive import SkipOnSpikeState as SkipOnSpikeState
from optax_gradctl._adaptive import ZClipState as ZClipState
from optax_gradctl._adaptive import autoclip as autoclip
from optax_gradctl._adaptive import skip_on_spike as skip_on_spike
from optax_gradctl._adaptive import zclip as zclip
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
  "AutoClipState",
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "SkipOnSpikeState",
  "UnitRescaleState",
  "ZClipState",
  "ZScoreLeafState",
  "ZScoreState",
  "autoclip",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "global_norm",
  "skip_on_spike",
  "stats",
  "unit_rescale",
  "zclip",
  "zscore",
)
