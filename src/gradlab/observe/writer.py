"""The one path from gradlab's instruments to TensorBoard: scalars, the custom-scalars layout, images, text.

Every instrument callback (grad_norm, activations, layout, grad_flow, health) writes through these functions,
so the run's event file is written by one writer, the TensorBoardLogger's. Scalars also go to every other
logger (CSV, ...); layouts, images and text are TensorBoard's only.
"""

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from gradlab.observe.lightning_private import file_writer


def tensorboard_logger(trainer: pl.Trainer) -> Optional[TensorBoardLogger]:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # One event holding every value: add_scalar per tag costs a queue hand-off to the writer thread
            # each, which was most of the gradient callback's time.
            summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])
            file_writer(logger.experiment).add_summary(summary, step)
        else:
            logger.log_metrics(metrics, step=step)


def log_summary(trainer: pl.Trainer, summary: Summary, step: int = 0) -> bool:
    """A ready-made Summary proto (a layout, an image, a text) into the TensorBoard event file; False without one."""
    logger = tensorboard_logger(trainer)
    if logger is None:
        return False
    file_writer(logger.experiment).add_summary(summary, step)
    return True


def log_histogram(trainer: pl.Trainer, tag: str, values, step: int) -> bool:
    logger = tensorboard_logger(trainer)
    if logger is None:
        return False
    logger.experiment.add_histogram(tag, values, step)
    return True


def log_figure(trainer: pl.Trainer, tag: str, figure, step: int) -> bool:
    """A matplotlib figure as a TensorBoard image (left open: the caller may still save it)."""
    logger = tensorboard_logger(trainer)
    if logger is None:
        return False
    logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    return True


def log_image_png(trainer: pl.Trainer, tag: str, png: bytes, height: int, width: int, step: int) -> bool:
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)  # 4: RGBA
    return log_summary(trainer, Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_text(trainer: pl.Trainer, tag: str, markdown: str, step: int) -> bool:
    from torch.utils.tensorboard.summary import (
        text,  # TensorBoard's own helper needs TensorFlow
    )

    return log_summary(trainer, text(tag, markdown), step)


def log_layout(trainer: pl.Trainer, layout, step: int = 0) -> bool:
    """A custom_scalar layout_pb2.Layout, as the Custom Scalars plugin reads it: one string tensor under the tag
    `custom_scalars__config__` (what tensorboard.plugins.custom_scalar.summary.pb writes, without TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    value = Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=metadata)
    return log_summary(trainer, Summary(value=[value]), step)


def flush(trainer: pl.Trainer) -> None:
    """Everything written so far onto disk, so that a reader of the event files (events.py) sees it."""
    logger = tensorboard_logger(trainer)
    if logger is not None:
        logger.experiment.flush()


def log_dir(trainer: pl.Trainer) -> Optional[str]:
    logger = tensorboard_logger(trainer)
    return logger.log_dir if logger is not None else None
