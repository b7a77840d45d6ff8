# OpenMP reads OMP_WAIT_POLICY once, when torch loads it; every entry point imports descent before torch
# (src/train.py, launcher workers unpickling a job, the benchmark, the tests): descent/engine/threads.py
from descent.engine import threads as _threads

_threads.set_wait_policy()
