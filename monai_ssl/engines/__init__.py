"""Training engines: where each training concept lives.

- :mod:`.trainer`: ``SemiSupervisedTrainer``, the one trainer of every method (students + pluggable loss terms,
  the step context the terms read, bf16/AMP, exact run length).
- :mod:`.optim`: the students' optimiser (one AdamW, a parameter group per student; torch's ``PolynomialLR``).
- :mod:`.handlers`: resumable checkpoints, validation and the final validation, progress, gradient all-reduce.
- :mod:`.selection`: per-student validation and the recorded inference weights (which student or mix).
"""
