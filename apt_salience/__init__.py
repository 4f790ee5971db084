"""apt_salience: streaming activation x gradient salience (APT) for pruning and adaptive tuning.

Example:
    >>> import apt_salience
    >>> tracker_cls = apt_salience.SalienceTracker
    >>> "attach" in apt_salience.__all__ and "select_blocks" in apt_salience.__all__
    True
"""

from ._version import __version__
from .config import (
    ConfigError,
    KurtosisConfig,
    PruningConfig,
    SalienceConfig,
    SalienceModeConfig,
    SitesConfig,
    load_config,
)
from .salience import (
    compute_activation_gradient_product,
    compute_kurtosis,
    head_param_count,
    hidden_param_count,
    neuron_param_count,
    normalize_scores,
    compressed_salience,
    kurtosis_of_moments,
)
from .masks import MaskHandle, apply_masks
from .pruning import PruneReport, load_pruned, prune_model, save_pruned
from .reconstruct import ReconstructReport, reconstruct
from .layout import BlockKind, BlockLayout
from .scores import BlockScores, SalienceScores
from .selection import Selection, SelectionWarning, select_blocks
from .pruner import RECOMMENDED_CONFIG, AdaptivePruner, PruningWarning, cubic_keep_ratio, update_masks
from .tracker import SalienceTracker, SalienceWarning, TrackerStateError, attach
from .tuning import AdaptiveTuner, adapter_importance, grow_lora_rank, plan_rank_growth
from .criteria import (
    ActivationNorms,
    WeightTaylor,
    magnitude_scores,
    random_scores,
    wanda_scores,
    weight_taylor_scores,
)

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
    "PruningConfig",
    "ConfigError",
    "SalienceWarning",
    "TrackerStateError",
    "load_config",
    "compute_activation_gradient_product",
    "compute_kurtosis",
    "normalize_scores",
    "compressed_salience",
    "kurtosis_of_moments",
    "head_param_count",
    "neuron_param_count",
    "hidden_param_count",
    "select_blocks",
    "Selection",
    "BlockLayout",
    "BlockKind",
    "SelectionWarning",
    "cubic_keep_ratio",
    "update_masks",
    "apply_masks",
    "MaskHandle",
    "prune_model",
    "PruneReport",
    "save_pruned",
    "load_pruned",
    "AdaptivePruner",
    "AdaptiveTuner",
    "PruningWarning",
    "RECOMMENDED_CONFIG",
    "reconstruct",
    "ReconstructReport",
    "adapter_importance",
    "plan_rank_growth",
    "grow_lora_rank",
    "magnitude_scores",
    "random_scores",
    "wanda_scores",
    "ActivationNorms",
    "weight_taylor_scores",
    "WeightTaylor",
]
