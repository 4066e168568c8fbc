"""The lab's fixed choices that its command line offers before any work starts.

Kept free of torch: ``lorakit --help`` builds every command's parser from these without importing
torch (a second or more); ``lowrank`` and ``recommend`` use the same values.
"""
from __future__ import annotations

LESSON_RANKS = (1, 2, 4, 8, 16, 32, 64)  # the parameter table's ranks
LESSON_SYNTHETIC = {"size": 100, "true_rank": 5, "ranks": (1, 2, 5, 10, 20, 50)}  # the synthetic SVD demo
MAX_MATRICES = 16  # model matrices analysed at most (the first ones matching, in layer order)
TASKS = ("simple", "medium", "complex")  # the rank rule table's task kinds
