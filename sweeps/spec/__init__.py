"""What a sweep is, as data: the config schema and its loading (YAML, ``--set`` overrides, field
errors), sweep names, trial statuses, and the errors bad input raises.

The lowest layer of ``sweeps``: it imports pydantic and yaml, never torch and no other layer.
Dataset, model and metric names are checked through the catalog :mod:`.catalog` is given (the
trial layer's registries, wired in by the package root), so the schema itself checks structure.
"""
