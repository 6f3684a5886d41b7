"""One module per library for what ``sweeps`` needs of it beyond its documented public API.

Every use of an Optuna, MLflow or Ray internal lives in :mod:`.optuna_adapter`,
:mod:`.mlflow_adapter` or :mod:`.ray_adapter`; ``tests/test_adapters.py`` pins the behaviour
each relies on (a contract test fails first when a release changes it) and checks that no other
module reaches into the libraries. pyproject.toml bounds the three libraries below their next
major release.
"""
