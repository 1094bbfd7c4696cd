"""optax_gradctl: gradient control for Optax that stays correct when gradients explode.

Composable :class:`optax.GradientTransformation` s (value clipping, norm
clipping, unit rescaling and z-score normalization; spike-aware, per-tensor,
unit-wise and per-example clipping; step skipping and per-layer monitoring)
that are exact over the whole float range and record their statistics in
their state.
"""

from optax_gradctl._adagc import AdaGCState as AdaGCState
from optax_gradctl._adagc import adagc as adagc
from optax_gradctl._autoclip import AutoClipState as AutoClipState
from optax_gradctl._autoclip import autoclip as autoclip
from optax_gradctl._clipping import ClipByGlobalNormState as ClipByGlobalNormState
from optax_gradctl._clipping import ClipByNormState as ClipByNormState
from optax_gradctl._clipping import ClipByValueState as ClipByValueState
from optax_gradctl._clipping import clip_by_global_norm as clip_by_global_norm
from optax_gradctl._clipping import clip_by_norm as clip_by_norm
from optax_gradctl._clipping import clip_by_value as clip_by_value
from optax_gradctl._estimator import EmaState as EmaState
from optax_gradctl._monitor import MonitorState as MonitorState
from optax_gradctl._monitor import global_norm as global_norm
from optax_gradctl._monitor import monitor as monitor
from optax_gradctl._monitor import top_level as top_level
from optax_gradctl._normalizing import UnitRescaleState as UnitRescaleState
from optax_gradctl._normalizing import ZScoreLeafState as ZScoreLeafState
from optax_gradctl._normalizing import ZScoreState as ZScoreState
from optax_gradctl._normalizing import unit_rescale as unit_rescale
from optax_gradctl._normalizing import zscore as zscore
from optax_gradctl._reduction.settings import ReductionSettings as ReductionSettings
from optax_gradctl._reduction.settings import reduction_settings as reduction_settings
from optax_gradctl._skipping import SkipOnSpikeState as SkipOnSpikeState
from optax_gradctl._skipping import skip_on_spike as skip_on_spike
from optax_gradctl._stats import stats as stats
from optax_gradctl._unitwise import AdaptiveGradClipState as AdaptiveGradClipState
from optax_gradctl._unitwise import PerExampleClipState as PerExampleClipState
from optax_gradctl._unitwise import adaptive_grad_clip as adaptive_grad_clip
from optax_gradctl._unitwise import per_example_clip as per_example_clip
from optax_gradctl._zclip import ZClipState as ZClipState
from optax_gradctl._zclip import zclip as zclip

__version__ = "0.2.0"

__all__ = (
  "AdaGCState",
  "AdaptiveGradClipState",
  "AutoClipState",
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "EmaState",
  "MonitorState",
  "PerExampleClipState",
  "ReductionSettings",
  "SkipOnSpikeState",
  "UnitRescaleState",
  "ZClipState",
  "ZScoreLeafState",
  "ZScoreState",
  "adagc",
  "adaptive_grad_clip",
  "autoclip",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "global_norm",
  "monitor",
  "per_example_clip",
  "reduction_settings",
  "skip_on_spike",
  "stats",
  "top_level",
  "unit_rescale",
  "zclip",
  "zscore",
)
