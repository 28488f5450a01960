"""The short results table printed at the end of a run."""

from rich.console import Console
from rich.table import Table


def print_results(metrics: dict, run_dir: str) -> None:
    table = Table(title="Results", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    numbers = [k for k in metrics if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    for key in sorted(k for k in numbers if "/" in k and not k.startswith(("grad_norm", "grad_noise/batch_size"))):
        table.add_row(key, f"{metrics[key]:.4f}")
    for key in ("epochs", "steps", "epoch", "step", "wall_time_s", "suggested_lr"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.3g}" if key == "suggested_lr" else str(metrics[key]))
    console = Console()
    console.print(table)
    if "grad_noise/reading" in metrics:  # what the gradient noise scale says about the batch size
        console.print(metrics["grad_noise/reading"], highlight=False)
    console.print(f"Run dir: {run_dir}   (tensorboard --logdir {run_dir})")
