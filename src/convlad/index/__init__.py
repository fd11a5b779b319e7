"""The index on disk: segments and a manifest (``segments``), the merge policy (``merge``), exact and
IVF-PQ search structures (``ann``, ``ivf``), ``IndexStore`` (``store``), single-file indexes of 0.1
(``legacy``), a folder brought in line (``sync``) and indexing on Ray (``cluster``)."""
