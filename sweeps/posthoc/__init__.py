"""What is done with trials once they are recorded: read them back as a DataFrame
(:mod:`.queries`, ``sweeps.results``), the report (:mod:`.report`), measures computed after the
fact (:mod:`.remeasure`, ``sweeps measure``), models trained elsewhere (:mod:`.manifest`,
``sweeps import``) and seed connectivity (:mod:`.connectivity`).

The top layer below the entry points (:mod:`sweeps.cli`, :mod:`sweeps.runner`): it may use every
other layer.
"""
