"""Never break a run: a failure planted in each hook of each instrument is reported once (console and health.json),
that instrument switches off, the others go on, and the weights equal those of a run without any instrument."""

import pytest
import torch

from gradlab.observe import Observatory
from gradlab.observe.activations import Accumulator, ActivationMonitor
from gradlab.observe.common import HOOKS, Instrument
from observed import EVERY, LitClassifier, fit, health, loader, scalars


def weights_after(tmp_path, callbacks) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = LitClassifier()
    fit(module, loader(), tmp_path, callbacks=callbacks, val_dataloaders=loader(8))  # val at step 4, epoch end
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return weights_after(tmp_path_factory.mktemp("plain"), [])


def planted_hooks() -> list[tuple[str, str]]:
    """(instrument, hook) for every hook an instrument defines that a plain fit calls."""
    out = []
    for cb in Observatory(curvature=True, grad_tests=True):
        for hook in HOOKS:
            fn = getattr(type(cb), hook)
            if getattr(fn, "_guarded", False) and hook not in ("on_exception",):
                out.append((cb.name, hook))
    return out


def boom(*args, **kwargs):
    raise RuntimeError("planted failure")


def check_reported(tmp_path, capsys, reference, name: str, where: str, layer: bool = False):
    err = capsys.readouterr().err
    assert err.count("instrument error") == 1, err  # once, though the hook runs at every step
    assert f"{name} failed in {where}" in err and "planted failure" in err and "Hint:" in err
    if name != "health":  # the report itself lists the failures of the others
        (failure,) = health(tmp_path)["instrument_failures"]
        assert failure["instrument"] == name and failure["hook"] == where and failure["hint"]
        assert bool(failure["layer"]) == layer
        assert health(tmp_path)["healthy"] is False
    return err


@pytest.mark.parametrize("name, hook", planted_hooks())
def test_a_failing_hook_switches_its_instrument_off_and_the_run_goes_on(tmp_path, capsys, monkeypatch, reference,
                                                                        name, hook):
    observatory = Observatory(**EVERY, curvature={"log_every_n_steps": 2, "probe_size": 8, "lanczos_iters": 3},
                              grad_tests={"log_every_n_steps": 1}, out_dir=str(tmp_path))
    monkeypatch.setattr(getattr(type(observatory[name]), hook), "__wrapped__", boom)
    after = weights_after(tmp_path, observatory)
    for n, w in reference.items():
        assert torch.equal(after[n], w), n  # bit-identical to a run without instruments
    check_reported(tmp_path, capsys, reference, name, hook)
    assert observatory[name].failure is not None
    if name != "grad_norm":  # the others go on
        assert "grad_norm/encoder.0.weight" in scalars(tmp_path)


@pytest.mark.parametrize("name, target, where", [
    ("grad_noise", "gradlab.observe.grad_noise.linear_sq", "hook"),      # a tensor hook, inside backward
    ("activations", Accumulator, "gelu"),                                # inside the forward's function mode
    ("activations", ActivationMonitor, "_fed"),                          # a module forward hook
])
def test_a_failure_inside_the_hosts_forward_or_backward_names_the_layer(tmp_path, capsys, monkeypatch, reference,
                                                                         name, target, where):
    if target is Accumulator:
        real = Accumulator.add

        def add(self, y, flat=None):
            if self.kind == "gelu":
                raise RuntimeError("planted failure")
            return real(self, y, flat)
        monkeypatch.setattr(Accumulator, "add", add)
    elif target is ActivationMonitor:
        def _fed(self, module, args, output):
            raise RuntimeError("planted failure")
        monkeypatch.setattr(ActivationMonitor, "_fed", _fed)
    else:
        monkeypatch.setattr(target, boom)
    observatory = Observatory(**EVERY, out_dir=str(tmp_path))
    after = weights_after(tmp_path, observatory)
    for n, w in reference.items():
        assert torch.equal(after[n], w), n
    err = check_reported(tmp_path, capsys, reference, name, where if where != "hook" else "hook",
                         layer=where != "gelu")
    assert observatory[name].failure is not None
    others = [cb for cb in observatory if cb.name != name]
    assert all(cb.failure is None for cb in others), err
    # the switched-off instrument left nothing attached: a plain forward afterwards runs as usual
    assert not torch._C._is_torch_function_mode_enabled()


def test_every_gradlab_callback_is_guarded():
    everything = Observatory(curvature=True, grad_tests=True)
    assert {cb.name for cb in everything} == {"grad_norm", "grad_noise", "activations", "optimizer_state",
                                              "curvature", "grad_tests", "layout", "grad_flow", "health"}
    assert all(isinstance(cb, Instrument) for cb in everything)
