"""What pretraining learned, measured as the papers do: weighted kNN on frozen features (``knn``),
the kNN monitor of a pretraining run (``monitor``) and the linear-classification protocol's
measure, the classifier's test accuracy (``classifier``).

Measures only, given encoder variables or a state and the data as sources: the runs that use
them (pretraining, linear evaluation) are ``run``'s, which imports this package, never the
reverse (``.importlinter``).

May import: ``algorithms``, ``models``, ``data``, ``config`` and the root modules. Never ``run``,
``interop`` or ``pod``.
"""
