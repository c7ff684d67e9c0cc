"""LR-schedule search: OneCycleLR vs CosineAnnealingWarmupRestarts vs poly, with their parameters.

    python experiments/tune_sched.py              # built-in synthetic world, tiny model, CPU
    python experiments/tune_sched.py --data /path/to/comp --model upernet_internimage_b \
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \
        --tracking-uri http://<mlflow-host>:5000

Run with --help for every flag. Trials are logged to MLflow (one child run per trial).
"""

import sys

from bldseg.tune.cli import main

if __name__ == "__main__":
    sys.exit(main("scheduler", __doc__))
