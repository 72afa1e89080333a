"""What pretraining learned, measured as the papers do: weighted kNN on frozen features (``knn``),
the kNN monitor of a pretraining run (``monitor``) and the linear-classification protocol
(``linear_eval``).

May import: ``algorithms``, ``models``, ``data``, ``config``, ``interop`` (a PyTorch file's
backbone), ``run`` (linear evaluation is a run of the ``linear`` algorithm) and the root modules.
Never ``pod``.
"""
