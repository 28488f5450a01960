"""What observes a run: the gradient instruments (one Lightning callback each), the health report and its rules,
the gradient-flow picture, the event-file reader and the one writer to TensorBoard.

The instruments in your own Lightning project (docs/own_model.md):

    from gradlab.observe import Observatory
    trainer = Trainer(callbacks=Observatory())                      # or [*Observatory(), your callbacks...]
    trainer = Trainer(callbacks=Observatory(grad_noise=False, grad_norm={"log_every_n_steps": 10}))

conf/callbacks/default.yaml builds the same objects for the template (tests/test_observatory.py compares them).
"""

from typing import Any, Optional, Union

Knobs = Union[bool, dict[str, Any], None]


def _classes() -> dict[str, type]:
    # In the order Lightning should call them: the health report reads what the others wrote.
    from gradlab.observe.activations import ActivationMonitor
    from gradlab.observe.curvature import CurvatureMonitor
    from gradlab.observe.grad_flow import GradFlowImage
    from gradlab.observe.grad_noise import GradNoiseMonitor
    from gradlab.observe.grad_norm import GradNormMonitor
    from gradlab.observe.grad_tests import GradTestMonitor
    from gradlab.observe.health import HealthReport
    from gradlab.observe.layout import TensorBoardLayout
    from gradlab.observe.optimizer_state import OptimizerStateMonitor

    return {"grad_norm": GradNormMonitor, "grad_noise": GradNoiseMonitor, "activations": ActivationMonitor,
            "optimizer_state": OptimizerStateMonitor, "curvature": CurvatureMonitor, "grad_tests": GradTestMonitor,
            "layout": TensorBoardLayout, "grad_flow": GradFlowImage, "health": HealthReport}


class Observatory(list):
    """The default instrument set as a list of Lightning callbacks: `Trainer(callbacks=Observatory())`.

    Each argument is one instrument: True (its defaults), False or None (left out), or a dict of its knobs,
    the same keys as in conf/callbacks/default.yaml. `strip_prefix` applies to every instrument that names
    layers (tags read `grad_norm/conv1.weight`, not `grad_norm/<strip_prefix>conv1.weight`); `out_dir` is where
    health.json goes (None: the trainer's default_root_dir). Every instrument follows
    `trainer.log_every_n_steps` unless told otherwise (gradlab.observe.common.EVERY_N), except grad_noise,
    which reads every 64 optimizer steps. The second-order instruments (`curvature`, `grad_tests`: docs/curvature.md)
    are off unless asked for: a sharpness reading costs tens of training steps.
    """

    def __init__(self, grad_norm: Knobs = True, grad_noise: Knobs = True, activations: Knobs = True,
                 optimizer_state: Knobs = True, curvature: Knobs = False, grad_tests: Knobs = False,
                 layout: Knobs = True, grad_flow: Knobs = True, health: Knobs = True, strip_prefix: str = "",
                 out_dir: Optional[str] = None):
        super().__init__()
        chosen = {"grad_norm": grad_norm, "grad_noise": grad_noise, "activations": activations,
                  "optimizer_state": optimizer_state, "curvature": curvature, "grad_tests": grad_tests,
                  "layout": layout, "grad_flow": grad_flow, "health": health}
        shared = {name: {"strip_prefix": strip_prefix}
                  for name in ("grad_norm", "grad_noise", "activations", "optimizer_state", "curvature", "grad_tests")}
        shared["health"] = {"out_dir": out_dir}
        for name, cls in _classes().items():
            knobs = chosen[name]
            if knobs is None or knobs is False:
                continue
            kwargs = {**shared.get(name, {}), **(knobs if isinstance(knobs, dict) else {})}
            self.append(cls(**kwargs))

    def __getitem__(self, key):  # observatory["grad_norm"] as well as observatory[0]
        if isinstance(key, str):
            found = [cb for cb in self if getattr(cb, "name", None) == key]
            if not found:
                raise KeyError(key)
            return found[0]
        return super().__getitem__(key)


__all__ = ["Observatory"]
