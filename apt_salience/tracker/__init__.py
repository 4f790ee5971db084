"""The salience tracker: hooks on a model's sites that stream APT's statistics into readings.

``apt_salience.attach(model, config)`` returns a :class:`SalienceTracker`; see
:mod:`apt_salience.tracker.core` for how its parts fit together.

Example:
    >>> from apt_salience.tracker import SalienceTracker, attach
    >>> SalienceTracker.attach.__doc__.split("(")[0]
    'Validate, find the sites and register the hooks '
"""

from .core import SalienceTracker, attach
from .errors import SalienceWarning, TrackerStateError

__all__ = ["SalienceTracker", "attach", "SalienceWarning", "TrackerStateError"]
