"""The sweep service's driver, in parts: a loop (:mod:`.loop`) that decides what runs next and
when the sweep ends, and the parts it is given, one per library:

* :mod:`.executor`: Ray (launch populations, stream their records, measure tasks, cancel);
* :mod:`.recorder`: MLflow (every write of the driver, and their concurrency);
* :mod:`.book`: Optuna (points to run, tells, the best trials, pruning decisions);
* :mod:`.records`: the typed records that pass between them.

The loop imports none of Ray, Optuna or MLflow: it is tested with fake parts
(``tests/test_loop.py``); each real part keeps its tests against the real service.
"""
