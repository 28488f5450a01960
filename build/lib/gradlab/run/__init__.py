"""What runs: train, evaluate and predict behind the entry points, the learning-rate finder, the one writer of a
run's results (results.py), trackers, DDP and precision choices, and the console."""
