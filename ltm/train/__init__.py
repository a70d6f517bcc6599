"""Training: the Trainer that `ltm train` runs (`trainer`), validation during training (`validate`), the stop flag
for preemption (`preemption`), the method at any number of ranks (`batch_scaling`) and what a run records about
itself (`metrics_log`)."""
