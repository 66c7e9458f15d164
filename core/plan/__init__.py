"""The memory planner: peak GPU memory of a training run from the model's architecture and the run's shape alone.

Pure arithmetic: no weights are read, nothing touches CUDA. ``gpus`` is the GPU table, ``shapes`` the planner's
inputs, ``cost`` the estimate by component, ``fit`` budgets and the changes that fit one, ``render`` the table
``fx plan`` prints. docs/memory.md explains each formula and how it was measured.
"""
