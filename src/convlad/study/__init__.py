"""Measuring: benchmark loaders (``datasets``), metrics, the eval cache, ``evaluate`` (a benchmark
through the one search), ``folds`` (group-wise K-fold choice, the protocol), ``sweep`` (layer × scale
sweeps), ``figures`` (Figures 3–4), ``synviews`` (synthetic views); their commands are ``cli_study``."""
