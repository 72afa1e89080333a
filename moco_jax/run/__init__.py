"""One run in a workdir, for training or evaluation: its set-up (``run_setup``), the loop and its
periodic actions (``trainer``, ``hooks``), checkpoints (``checkpointing``, ``checkpoint_format``,
``checkpoint_policies``, ``fingerprint``), records and plots (``metrics_io``), the workdir lock,
the command lines' one-line errors (``cli_errors``), reading another run's workdir without
changing it (``saved_run``) and the linear-evaluation run (``linear_eval``: the same loop, another
algorithm and measure). Tests add their fault injection to the loop
(``trainer.INSTALLED_ACTIONS``, tests/faults.py); no production code calls it.

May import: ``algorithms``, ``models``, ``data``, ``config``, ``evaluation`` (the kNN and
classifier monitors: ``evaluation`` never imports ``run``), ``interop`` (``init_from``, a PyTorch
file's backbone) and the root modules. Never ``pod``; never ``torch``.
"""
