"""What keeps a run's files: run folders (run_dirs.py), checkpoints read safely (load.py), written atomically
(atomic_io.py), and on time, steps and signals (resume.py)."""
