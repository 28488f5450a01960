"""What a config read back from a file may build: an explicit list of classes and functions, nothing else.

    python eval.py ckpt_path=downloaded.ckpt     # model and data rebuilt from the checkpoint's gradlab_config

Your own command line and conf/ are code: Hydra's `instantiate` builds whatever they name. A config that comes
back from a file (a checkpoint's `gradlab_config`, which someone else may have written) is data. Hydra resolves a
`_target_` by walking attributes, so a name under `gradlab.` can reach any function a gradlab module imported
(`gradlab.data.imdb.torch.save`, `gradlab.checkpoints.load.os.system`), and `_args_` hands it arguments. So:
  - the dotted name must be on ALLOWED, spelt exactly so (no attribute chains, no other spelling of an entry);
  - Hydra's own resolution (`hydra.utils.get_object`) must give the very object defined at the entry's home
    (`__module__` and `__qualname__`, checked by identity), of the entry's base class (or, for a function, whose
    result is one);
  - no Hydra key but `_target_` (`_args_`, `_partial_`, `_recursive_`, `_convert_` are refused), and every other
    key must be an argument the target takes. Values are plain data; nothing is resolved (no `${...}`).
The objects are then built here, bottom-up, by calling them with those keyword arguments: the same objects that
`instantiate(cfg, _convert_="object")` builds from the config train.py stored, and nothing else.
"""

import importlib
import inspect
from typing import Any

from gradlab.errors import UserError

# dotted name as a config writes it -> (home: `__module__.__qualname__` of the object, the base class it must be
# or return). Adding a model or data module to gradlab means adding it here, or eval/predict refuse its checkpoints.
ALLOWED: dict[str, tuple[str, str]] = {
    "gradlab.models.classifier.ClassifierModule": ("gradlab.models.classifier.ClassifierModule",
                                                   "lightning.pytorch.LightningModule"),
    "gradlab.models.cnn.MnistCNN": ("gradlab.models.cnn.MnistCNN", "torch.nn.Module"),
    "gradlab.models.mlp.ManualMLP": ("gradlab.models.mlp.ManualMLP", "torch.nn.Module"),
    "gradlab.models.rnn.SentimentRNN": ("gradlab.models.rnn.SentimentRNN", "torch.nn.Module"),
    "gradlab.models.reference_net.Net": ("gradlab.models.reference_net.Net", "torch.nn.Module"),
    "gradlab.models.mlp.classification_loss": ("gradlab.models.mlp.classification_loss", "torch.nn.Module"),
    "torch.nn.NLLLoss": ("torch.nn.modules.loss.NLLLoss", "torch.nn.Module"),
    "torch.nn.CrossEntropyLoss": ("torch.nn.modules.loss.CrossEntropyLoss", "torch.nn.Module"),
    "torch.nn.BCEWithLogitsLoss": ("torch.nn.modules.loss.BCEWithLogitsLoss", "torch.nn.Module"),
    "gradlab.data.mnist.MNISTDataModule": ("gradlab.data.mnist.MNISTDataModule", "lightning.pytorch.LightningDataModule"),
    "gradlab.data.imdb.IMDBDataModule": ("gradlab.data.imdb.IMDBDataModule", "lightning.pytorch.LightningDataModule"),
    "gradlab.data.toy.ToyDataModule": ("gradlab.data.toy.ToyDataModule", "lightning.pytorch.LightningDataModule"),
}
# Hydra keys an entry may use, by entry (none today: no stored config needs positional arguments or partials).
HYDRA_KEYS_ALLOWED: dict[str, set[str]] = {}
HYDRA_KEYS = {"_target_", "_args_", "_partial_", "_recursive_", "_convert_"}


def build(config: Any, where: str, source: str) -> Any:
    """The object `config` describes (a dict with an allow-listed `_target_`), its nested configs built first;
    plain values as they are. UserError naming `where` (e.g. model.criterion) and the file `source` otherwise."""
    if isinstance(config, list):
        return [build(value, f"{where}[{i}]", source) for i, value in enumerate(config)]
    if not isinstance(config, dict):
        return config
    if "_target_" not in config:
        return {key: build(value, f"{where}.{key}", source) for key, value in config.items()}
    target = config["_target_"]
    obj = resolve(target, where, source)
    hydra_keys = set(config) & HYDRA_KEYS - {"_target_"} - HYDRA_KEYS_ALLOWED.get(str(target), set())
    if hydra_keys:
        raise UserError(f"{source}: its config gives {where} the Hydra key(s) {', '.join(sorted(hydra_keys))}, which "
                        f"a config read from a file may not use ({where}._target_={target!r} is built with keyword "
                        "arguments only). Use a checkpoint written by train.py.")
    _check_arguments(obj, config, where, source)
    kwargs = {key: build(value, f"{where}.{key}", source) for key, value in config.items() if key != "_target_"}
    try:
        result = obj(**kwargs)
    except UserError:
        raise
    except Exception as err:  # a value of the wrong type or size: the file's fault, said in one paragraph
        text = " ".join(str(err).split())[:200]
        raise UserError(f"{source}: {where} ({target}) cannot be built from the config stored in the file "
                        f"({type(err).__name__}: {text}). Use a checkpoint written by train.py.") from None
    base = _base(ALLOWED[target][1])
    if not isinstance(result, base):
        raise UserError(f"{source}: {where}._target_={target!r} built a {type(result).__name__}, not a "
                        f"{base.__name__}.")
    return result


def resolve(target: Any, where: str, source: str) -> Any:
    """The allow-listed object `target` names, found by Hydra's resolution and checked against its home."""
    refused = (f"{source}: its config names {where}._target_={target!r}, which is not on the list of what a "
               "checkpoint may build (gradlab's models, losses and data modules, by their exact names: "
               "gradlab.checkpoints.allow_list.ALLOWED). A file from elsewhere may name anything; only those are built.")
    if not isinstance(target, str) or target not in ALLOWED:
        raise UserError(refused)
    from hydra.utils import get_object

    home, base = ALLOWED[target]
    obj = get_object(target)
    module_name, _, qualname = home.rpartition(".")
    defined = getattr(importlib.import_module(module_name), qualname, None)
    if obj is not defined or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}" != home:
        raise UserError(refused)
    if inspect.isclass(obj) and not issubclass(obj, _base(base)):
        raise UserError(refused)
    if not inspect.isclass(obj) and not inspect.isfunction(obj):
        raise UserError(refused)
    return obj


def _check_arguments(obj: Any, config: dict, where: str, source: str) -> None:
    odd = [repr(key) for key in config if not (isinstance(key, str) and key.isidentifier())]
    if odd:
        raise UserError(f"{source}: its config gives {where} the key(s) {', '.join(odd[:3])}, which are not "
                        "argument names.")
    params = inspect.signature(obj).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [key for key in config if key not in HYDRA_KEYS and key not in params]
    if unknown:
        raise UserError(f"{source}: its config gives {where} the key(s) {', '.join(unknown)}, which "
                        f"{config['_target_']} does not take.")


def _base(dotted: str) -> type:
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)

