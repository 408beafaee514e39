"""Step-time and memory benchmarks of Orth-Dion, Dion, Muon and AdamW.

Run from the repository root:

* ``python -m benchmarks.step_time``: update time against the matmul roofline
  and Muon, with the optimizer state and temporary memory of each update;
* ``python -m benchmarks.memory``: the memory columns alone (compiles, never
  runs an update, so it is quick even at large sizes);
* ``python -m benchmarks.breakdown``: where Orth-Dion's update time goes.

``workload`` holds what they share: the weight sets, the optimizers and the
compiled, donated update.
"""
