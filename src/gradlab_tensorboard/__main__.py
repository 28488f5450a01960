"""TensorBoard with the GRADIENTS tab, whether or not the `tensorboard_plugins` entry point is installed yet.

    python -m gradlab_tensorboard --logdir logs --port 6006     # any of TensorBoard's flags
"""

import sys

from tensorboard import default, program

from gradlab_tensorboard.plugin import GradientsPlugin


def plugins() -> list:
    """TensorBoard's plugins (static and installed dynamic ones) with the GRADIENTS tab exactly once."""
    return [p for p in default.get_plugins() if getattr(p, "plugin_name", None) != GradientsPlugin.plugin_name] \
        + [GradientsPlugin]


def main(argv: list[str] | None = None) -> None:
    tb = program.TensorBoard(plugins=plugins())
    tb.configure(argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    sys.exit(tb.main())


if __name__ == "__main__":
    main()
