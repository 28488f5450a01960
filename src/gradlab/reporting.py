"""The short results table printed at the end of a run."""

from rich.console import Console
from rich.table import Table


def print_results(metrics: dict, run_dir: str) -> None:
    table = Table(title="Results", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in metrics if "/" in k and not k.startswith("grad_norm")):
        table.add_row(key, f"{metrics[key]:.4f}")
    for key in ("epochs", "steps", "epoch", "step", "wall_time_s", "suggested_lr"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.3g}" if key == "suggested_lr" else str(metrics[key]))
    console = Console()
    console.print(table)
    console.print(f"Run dir: {run_dir}   (tensorboard --logdir {run_dir})")
