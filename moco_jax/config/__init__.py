"""A run's config: every field with its default (``defaults``), the up-front checks that turn a
bad value into one clear error before anything is compiled (``validation``, ``checks``,
``shape_rules``), and whether a saved run's config fits this one (``compatibility``).

May import: ``algorithms`` and ``models`` (their registries), ``data.folder_source`` (what a
``folder:`` dataset name is), the root's ``storage``.
``defaults`` and ``checks`` import neither JAX nor Flax: a config file or a bad command line is
read in a fraction of a second.
"""
