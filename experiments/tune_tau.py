"""Co-teaching search for noisy masks: forget rate tau, its ramp T_k, tile vs pixel selection.

    python experiments/tune_tau.py                      # built-in synthetic world, tiny model, CPU
    python experiments/tune_tau.py --data /path/to/comp --model upernet_internimage_b \
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \
        --tracking-uri http://<mlflow-host>:5000

Run with --help for every flag. Trials are logged to MLflow (one child run per trial).
"""

import sys

from bldseg.tune.cli import main

if __name__ == "__main__":
    sys.exit(main("coteaching", __doc__))
