"""apt_salience: streaming activation x gradient salience (APT) for pruning and adaptive tuning.

Example:
    >>> import apt_salience
    >>> sorted(apt_salience.__all__)[:3]
    ['BlockScores', 'ConfigError', 'KurtosisConfig']
"""

from ._version import __version__
from .config import ConfigError, KurtosisConfig, SalienceConfig, SalienceModeConfig, SitesConfig, load_config
from .salience import (
    compute_activation_gradient_product,
    compute_kurtosis,
    head_param_count,
    hidden_param_count,
    neuron_param_count,
    normalize_scores,
)
from .scores import BlockScores, SalienceScores
from .tracker import SalienceTracker, SalienceWarning, TrackerStateError, attach

__all__ = [
    "__version__",
    "attach",
    "SalienceTracker",
    "SalienceScores",
    "BlockScores",
    "SalienceConfig",
    "KurtosisConfig",
    "SalienceModeConfig",
    "SitesConfig",
    "ConfigError",
    "SalienceWarning",
    "TrackerStateError",
    "load_config",
    "compute_activation_gradient_product",
    "compute_kurtosis",
    "normalize_scores",
    "head_param_count",
    "neuron_param_count",
    "hidden_param_count",
]
