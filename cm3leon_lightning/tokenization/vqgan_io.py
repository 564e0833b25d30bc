"""Loading and saving VQGAN weights: taming-transformers checkpoints, Chameleon's tokenizer, and our own format.

Formats :func:`load_vqgan` understands:

* **ours** (:func:`save_vqgan`, which never replaces a saved VQGAN unless told to): a directory with
  ``config.json`` and ``model.safetensors``.
* **taming-transformers**: a Lightning ``.ckpt`` whose ``state_dict`` holds ``encoder.*``, ``decoder.*``,
  ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.*`` and the training loss's ``loss.*`` (dropped). Its
  architecture comes from ``preset=``, ``config_path=`` (taming's ``configs/model.yaml``), or is found next to the
  checkpoint (``<name>.yaml``, ``vqgan.yaml``, ``../configs/model.yaml``); a taming log directory
  (``checkpoints/last.ckpt`` + ``configs/model.yaml``) can be passed as is.
* **Chameleon**: ``vqgan.ckpt`` with ``vqgan.yaml`` (same yaml schema as taming), or the directory holding both.
* **VQGANModule** (``cm3leon fit`` with the VQGAN module, e.g. ``checkpoints/last.ckpt``): a Lightning ``.ckpt``
  whose ``state_dict`` holds ``vqgan.*`` (plus the discriminator's and LPIPS' tensors, dropped) and whose
  ``hyper_parameters`` record the module's ``preset`` and architecture overrides, from which the config is built.

Every file is read with ``torch.load(weights_only=True)``. Lightning 1.x checkpoints, taming's published ones
included, also pickle Python objects (callback classes, hyper-parameters); such a file is refused unless the caller
passes ``trust_pickle=True``, which unpickles it in full and so runs whatever code it names. Re-saving it once with
:func:`save_vqgan` removes the need.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from cm3leon_lightning.files import save_safetensors
from cm3leon_lightning.tokenization.vqgan import VQGAN, VQGANConfig, config_from_overrides
from cm3leon_lightning.tokenization.vqgan_config import warn_unused_attn_resolutions

FORMAT_NAME = "cm3leon_lightning.vqgan"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_EMA_KEYS = ("quantize.ema_cluster_size", "quantize.ema_embed_sum")
_MODULE_PREFIX = "vqgan."  # VQGANModule checkpoints
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", b"\x80"  # how every torch.save file begins
# taming / latent-diffusion ddconfig options with the only value this VQGAN builds (another one would load weights
# into a different network, or apply tanh to the output, without a word).
_DDCONFIG_BUILT: dict[str, tuple[Any, ...]] = {
    "resamp_with_conv": (True,),
    "tanh_out": (False,),
    "give_pre_end": (False,),
    "use_linear_attn": (False,),
    "attn_type": ("vanilla", "vanilla-xformers"),  # the same softmax attention and weights
}


def config_from_taming_yaml(path: str | Path) -> VQGANConfig:
    """Read a taming-transformers / Chameleon model yaml (``model.params.{ddconfig, n_embed, embed_dim}``).

    Raises:
        ValueError: the yaml lacks those fields or asks for something this VQGAN does not build (``double_z``).
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except UnicodeDecodeError as e:  # yaml's own errors name the file; a decoding error does not
        raise ValueError(f"{path}: not a UTF-8 text file, so no taming model yaml ({e})") from e
    model = doc.get("model", doc) if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise ValueError(f"{path}: expected a taming model yaml with model.params.ddconfig, n_embed and embed_dim")
    dd = params["ddconfig"]
    if dd.get("double_z", False):
        raise ValueError(f"{path}: ddconfig.double_z is true (a KL autoencoder), a VQGAN needs double_z: false")
    for key, built in _DDCONFIG_BUILT.items():  # options that change the network or its output
        if key in dd and dd[key] not in built:
            allowed = " or ".join(map(repr, built))
            raise ValueError(f"{path}: ddconfig.{key} is {dd[key]!r}; this VQGAN builds only {key}: {allowed}")
    try:
        with warn_unused_attn_resolutions(str(path)):  # published yamls may list sides no level has
            cfg = VQGANConfig(
                resolution=int(dd["resolution"]),
                in_channels=int(dd.get("in_channels", 3)),
                out_ch=int(dd.get("out_ch", 3)),
                ch=int(dd["ch"]),
                ch_mult=tuple(dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
                z_channels=int(dd["z_channels"]),
                embed_dim=int(params["embed_dim"]),
                n_embed=int(params["n_embed"]),
                dropout=float(dd.get("dropout", 0.0)),
                quantizer="gumbel" if "Gumbel" in str(model.get("target", "")) else "vq",
                gumbel_kl_weight=float(params.get("kl_weight", 1e-8)),
            )
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]!r} in model.params / ddconfig") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: model.params / ddconfig do not describe a VQGAN: {e}") from e
    return cfg


def read_config(path: str | Path) -> VQGANConfig:
    """A config from our ``config.json`` or a taming / Chameleon ``.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN config file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        return config_from_taming_yaml(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    fmt, version = (doc.get("format"), doc.get("format_version")) if isinstance(doc, dict) else (None, None)
    if fmt != FORMAT_NAME or version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a {FORMAT_NAME} config (format {fmt!r}, version {version!r};"
            f" expected {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    if "config" not in doc:
        raise ValueError(f"{path}: lacks the field 'config' (the VQGAN architecture)")
    with warn_unused_attn_resolutions(str(path)):  # saved before unused attn_resolutions were refused
        return VQGANConfig.from_dict(doc["config"], source=f"{path} field 'config'")


def read_state_dict(
    path: str | Path, trust_pickle: bool = False, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, ``loss.*`` entries dropped (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, trust_pickle, map_location)[0]


def read_checkpoint(
    path: str | Path, trust_pickle: bool = False, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], VQGANConfig | None]:
    """The VQGAN tensors of a checkpoint file, and the architecture when the file records it.

    A ``VQGANModule`` training checkpoint (``state_dict`` with ``vqgan.*`` keys, ``hyper_parameters`` with the
    module's ``preset`` and overrides) gives its ``vqgan.*`` tensors, prefix stripped (the discriminator's, LPIPS'
    and ``train_steps`` dropped), and the config the module built; any other file gives its tensors, ``loss.*``
    entries dropped, and None.

    Args:
        path: ``.safetensors``, or a torch file (a Lightning checkpoint with ``state_dict``, or a plain state dict).
        trust_pickle: allow full unpickling for files that ``torch.load(weights_only=True)`` refuses. Only for files
            from a trusted source: unpickling can run arbitrary code.
        map_location: where the tensors are loaded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is no checkpoint (an image, a text file), needs unpickling and ``trust_pickle`` is
            False, holds no state dict, or its ``hyper_parameters`` name an invalid architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(map_location)), None
        except Exception as e:  # safetensors' own error type names neither the file nor what is wrong with it
            raise ValueError(f"{path}: cannot be read as safetensors ({_first_line(e)})") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        _refuse_non_checkpoint(path, e)  # an image, a text file...: say so, not "pickled objects"
        if trust_pickle:
            raise ValueError(f"{path}: cannot be unpickled as a torch checkpoint ({_first_line(e)})") from e
        raise ValueError(
            f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses to run (Lightning 1.x "
            f"checkpoints such as taming-transformers' store callback classes), or is not a torch checkpoint. If you "
            f"trust the file, load it with trust_pickle=True (e.g. VQGAN.from_pretrained(path, ..., "
            f"trust_pickle=True)) and re-save it with save_pretrained(). Details: {_first_line(e)}"
        ) from e
    except ModuleNotFoundError as e:  # trust_pickle: a class of the pickle lives in a package not installed here
        raise ValueError(f"{path}: unpickling needs the Python module {e.name!r}, which is not installed") from e
    except Exception as e:  # a truncated or foreign file: torch says neither which file nor, often, what is wrong
        _refuse_non_checkpoint(path, e)
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({_first_line(e)})") from e
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, or a checkpoint with a 'state_dict' entry")
    if _MODULE_PREFIX + "encoder.conv_in.weight" not in obj:
        return {k: v for k, v in obj.items() if not k.startswith("loss.")}, None
    state = {k[len(_MODULE_PREFIX) :]: v for k, v in obj.items() if k.startswith(_MODULE_PREFIX)}
    if not isinstance(hparams, dict) or not isinstance(hparams.get("preset"), str):
        return state, None
    try:
        with warn_unused_attn_resolutions(str(path)):  # trained before unused attn_resolutions were refused
            config = config_from_overrides(hparams["preset"], hparams)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: hyper_parameters do not describe a VQGAN ({e})") from e
    return state, config


def _refuse_non_checkpoint(path: Path, err: Exception) -> None:
    """Raise a clear error when ``path`` (which ``torch.load`` failed on) is no torch file at all.

    A torch checkpoint begins as a zip archive (``PK\\x03\\x04``, torch >= 1.6) or a pickle (``\\x80``, the legacy
    format); any other file (an image, a text file, an empty file) is not a VQGAN checkpoint.
    """
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        return
    what = "it is empty" if not head else f"it begins with {head!r}, not a zip archive or a pickle"
    raise ValueError(
        f"{path}: not a VQGAN checkpoint ({what}); expected a torch .ckpt / .pt, a .safetensors file, or a directory "
        f"holding {WEIGHTS_FILE} and {CONFIG_FILE}"
    ) from err


def _first_line(e: BaseException) -> str:
    """``e``'s type and the first line of its message (torch's run to many lines; some are empty)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _describe(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def load_state_dict_checked(model: VQGAN, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``, with an error that lists the first missing / unexpected keys.

    EMA buffers absent from the file (a checkpoint trained with gradients, loaded into an EMA config) are
    initialised from the codebook.
    """
    expected = model.state_dict()
    state_dict = dict(state_dict)
    if model.config.ema_decay is not None and "quantize.embedding.weight" in state_dict:
        state_dict.setdefault(_EMA_KEYS[0], torch.ones(model.config.n_embed))
        state_dict.setdefault(_EMA_KEYS[1], state_dict["quantize.embedding.weight"].clone())
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: state dict does not match the VQGAN config (quantizer={model.config.quantizer}, "
            f"ch_mult={list(model.config.ch_mult)}, n_embed={model.config.n_embed}): missing keys "
            f"{_describe(missing)}; unexpected keys {_describe(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"{source}: tensor shapes (file vs config) differ: {_describe(wrong, 3)}")
    model.load_state_dict(state_dict, strict=True)


def _find_config_next_to(ckpt: Path) -> Path | None:
    for candidate in (
        ckpt.with_suffix(".yaml"),
        ckpt.parent / "vqgan.yaml",
        ckpt.parent / CONFIG_FILE,
        ckpt.parent.parent / "configs" / "model.yaml",
    ):
        if candidate.is_file():
            return candidate
    return None


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """A directory or weights file -> (weights file, config file found with it or None)."""
    if not path.exists():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    if path.is_dir():
        for weights, config in (
            (WEIGHTS_FILE, CONFIG_FILE),  # ours
            ("vqgan.ckpt", "vqgan.yaml"),  # Chameleon
            ("checkpoints/last.ckpt", "configs/model.yaml"),  # taming log directory
        ):
            if (path / weights).is_file():
                return path / weights, (path / config) if (path / config).is_file() else None
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}, vqgan.ckpt or checkpoints/last.ckpt in this directory")
    return path, _find_config_next_to(path)


def load_vqgan(
    path: str | Path,
    preset: str | VQGANConfig | None = None,
    config_path: str | Path | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> VQGAN:
    """Load a VQGAN (returned in eval mode, in float32, on ``map_location``).

    Weights stored in half precision are widened exactly; a model saved in bf16 / fp16 encodes as it did once cast
    back with ``.to(dtype)``. A config file or checkpoint whose ``attn_resolutions`` list sides no level has (which
    built no attention block) loads with a warning naming the file, those values dropped from the config.

    Args:
        path: a directory (ours, Chameleon's, a taming log directory) or a weights file (``.ckpt``, ``.pt``,
            ``.safetensors``).
        preset: architecture as a preset name or a :class:`VQGANConfig`; overrides any config file found and the
            architecture a ``VQGANModule`` checkpoint records.
        config_path: architecture from this file (our ``config.json`` or a taming / Chameleon ``.yaml``); overrides
            the architecture a ``VQGANModule`` checkpoint records.
        trust_pickle: allow unpickling Python objects (see :func:`read_state_dict`).
        map_location: device of the returned model.

    Raises:
        FileNotFoundError: the path or config file does not exist.
        ValueError: unknown architecture, refused pickle, or keys / shapes that do not match the architecture.
    """
    if preset is not None and config_path is not None:
        raise ValueError("pass either preset or config_path, not both")
    weights, found_config = _resolve(Path(path))
    state_dict, recorded = read_checkpoint(weights, trust_pickle, "cpu")
    if isinstance(preset, VQGANConfig):
        config, origin = preset, "the VQGANConfig passed as preset"
    elif preset is not None:
        config, origin = VQGANConfig.from_name(preset), f"preset {preset!r}"
    elif config_path is not None:
        config, origin = read_config(config_path), f"config_path {config_path}"
    elif recorded is not None:
        config, origin = recorded, "the checkpoint's hyper_parameters"
    elif found_config is not None:
        config, origin = read_config(found_config), f"{found_config}, found with the weights"
    else:
        raise ValueError(
            f"cannot tell the architecture of {weights}: pass preset= (one of f8_8192, f16_16384, chameleon, ...) or "
            f"config_path= (a taming/Chameleon .yaml or our config.json)"
        )
    model = VQGAN(config)
    load_state_dict_checked(model, state_dict, f"{weights} (architecture from {origin})")
    return model.to(map_location).eval()


def save_vqgan(model: VQGAN, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (no pickle) into ``directory`` (created); returns it.

    Both files are written under temporary names in ``directory`` and moved into place when both are complete,
    ``config.json`` last: an error while writing leaves a VQGAN already saved there as it was.

    Raises:
        FileExistsError: ``directory`` already holds one of the two files and ``overwrite`` is false.
    """
    directory = Path(directory)
    existing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a VQGAN ({', '.join(existing)}); pass overwrite=True to replace it"
        )
    doc: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=directory))
    try:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
