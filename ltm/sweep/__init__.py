"""`ltm sweep`: paired multi-seed experiments — is variant B better than A on these test sets?

Every (variant, seed) point is trained through every budget (`ltm.sweep.run.run_point`), each budget's checkpoint
is scored on val, val selects one checkpoint, and that one is scored once on every test set. The table
(`ltm.sweep.table`) gives per variant and test set the mean AUC with its 95% t-interval over seeds, the paired
differences against a reference variant with a verdict, and the val learning curves; the statistics are
`ltm.sweep.stats`, shared with `ltm reproduce` and `bench/generalization.py`. The command, with its SLURM array,
is `launcher.sweep` (SLURM sits above `ltm`). docs/sweep.md: "Is my gain real?".
"""

from ltm.sweep.run import Sweep, check_sweep, parse_variant, point_config, run_local, run_point, select_budget
from ltm.sweep.stats import Interval, Paired, Verdict, interval, n_needed, paired, power, verdict

__all__ = ["Interval", "Paired", "Sweep", "Verdict", "check_sweep", "interval", "n_needed", "paired",
           "parse_variant", "point_config", "power", "run_local", "run_point", "select_budget", "verdict"]
