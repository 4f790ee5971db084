"""Optional integrations with training frameworks.

Each lives in its own module and imports its framework only when that module is imported,
so ``import apt_salience`` (and this package) never imports them:

* :mod:`apt_salience.integrations.huggingface` -- :class:`SalienceCallback` and
  :class:`AdaptivePruningCallback` for the ``transformers.Trainer``.

Usage: ``from apt_salience.integrations.huggingface import SalienceCallback``.
"""

__all__: list = []
