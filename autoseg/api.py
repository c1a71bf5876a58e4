"""The Python API and the one pipeline builder: ``autoseg.load(source, **overrides)``.

::

    import autoseg

    seg = autoseg.load("demo")                       # a preset, a pipeline YAML, a saved folder or a Hub repo id
    pred = seg("photo.jpg")                          # or a PIL image, an array, or a list of them
    pred.vocabulary, pred.label_map, pred.mask("sky"), pred.overlay(), pred.to_json()
    seg.save_pretrained("my-pipeline")               # one folder: pipeline.yaml + every model
    seg = autoseg.load("my-pipeline", device="cuda", dtype="bfloat16")

Everything that turns settings into a running pipeline goes through :func:`resolve_config` (read, override, check once
against the machine and the models' ``config.json``) and :func:`build_pipeline` (load every model, the enhancer
included, and cast all of them to one device and dtype): ``infer.py``, ``eval.py``, the page, the recipes and the
Lightning modules call them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from autoseg.config import PIPELINE_FILE, PipelineConfig, config_with, load_config, presets, to_dict
from autoseg.config_checks import check_runtime, resolve_device
from autoseg.models.blip import BlipCaptioner, load_blip
from autoseg.models.enhancer import load_enhancer, save_enhancer
from autoseg.models.loading import ModelLoadError, hub_offline, hub_reachable
from autoseg.models.segmenters import BACKENDS, build_segmenter
from autoseg.pipeline import AutoSegPipeline
from autoseg.utils.settings import merge
from autoseg.vocab.bboost import BBoost
from autoseg.vocab.nouns import NounExtractor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRAINING_RECORD = "autoseg_training.json"  # what a model was trained on (the adapt recipe reads it); kept on save
SOURCE_FORMS = (
    "a preset name ({presets}), a pipeline YAML, a folder written by save_pretrained, or a Hugging Face repo id"
)


def load(source: str | os.PathLike | PipelineConfig | None = None, **overrides: Any) -> AutoSegPipeline:
    """A ready pipeline: every model loaded, checked once, on one device in one dtype.

    Args:
        source: a preset name (``"demo"``), a pipeline YAML, a folder written by
            :meth:`~autoseg.pipeline.AutoSegPipeline.save_pretrained`, a Hugging Face repo id holding such a folder,
            or a :class:`PipelineConfig`; None: the default pipeline (BLIP-large + CLIPSeg from the Hub).
        overrides: settings on top: any :class:`PipelineConfig` field (``device="cuda"``, ``dtype="bfloat16"``,
            ``seed=1``, ``batch_size=8``, ``max_names=10``, ``blip=DIR``, ``enhancer=None``, ``bboost={"k_max": 6}``,
            ...), plus ``segmenter_backend="sam3"`` and ``segmenter=ID_OR_DIR`` (or a mapping of segmenter settings).

    Raises:
        autoseg.config.ConfigError: a bad setting (one line naming it and what is allowed).
        FileNotFoundError / ValueError: a source that is none of the forms above.
        autoseg.models.loading.ModelLoadError: a model that cannot be loaded (the message says how to provide it).
    """
    config, where = resolve_config(source, overrides_from_kwargs(overrides))
    return build_pipeline(config, checked=True, where=where)


def overrides_from_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config overrides from :func:`load`'s keyword arguments.

    Raises:
        TypeError: an unknown keyword (the message lists the allowed ones).
    """
    fields = set(PipelineConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields - {"segmenter_backend"})
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; allowed: {sorted(fields | {'segmenter_backend'})}")
    out: dict[str, Any] = {}
    if kwargs.get("segmenter_backend") is not None:  # another backend: its default model unless a source is given
        out["segmenter"] = {"name": kwargs["segmenter_backend"], "source": None}
    for key, value in kwargs.items():
        if key == "segmenter_backend":
            continue
        if key == "segmenter" and not isinstance(value, Mapping):
            out.setdefault("segmenter", {})["source"] = None if value is None else os.fspath(value)
        elif isinstance(value, Mapping):
            out[key] = merge(out.get(key, {}), value)
        else:
            out[key] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return out


def resolve_config(
    source: str | os.PathLike | PipelineConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
    overrides_source: str = "overrides",
) -> tuple[PipelineConfig, str]:
    """The checked config of ``source`` with ``overrides``, and where it came from (for messages); loads no weights.

    Types and ranges, the device, the model sources, the spaCy pipeline and what the models' ``config.json`` files
    say are all checked here, once (:func:`autoseg.config_checks.check_runtime`).
    """
    overrides = dict(overrides or {})
    if isinstance(source, PipelineConfig):
        where = "config"
        config = config_with(to_dict(source), overrides, where, overrides_source)
    else:
        path = pipeline_yaml(source) if source is not None else None
        where = str(path) if path is not None else "config"
        config = load_config(path, overrides, overrides_source=overrides_source)
    check_runtime(config, where, overrides, overrides_source)
    return config, where


def pipeline_yaml(source: str | os.PathLike) -> Path:
    """The pipeline YAML that ``source`` names (a Hub repo is downloaded, or read from the local cache).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without ``pipeline.yaml``.
        ValueError: a name that is neither a preset nor a repo id.
    """
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / PIPELINE_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {PIPELINE_FILE} in this folder; expected {_forms()}")
        return path / PIPELINE_FILE
    if name in presets():
        from autoseg.config import preset_path

        return preset_path(name)
    if name.startswith((".", "/", "~")) or name.endswith((".yaml", ".yml")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such file or folder, and not a preset; expected {_forms()}")
    folder = hub_folder(name)
    if not (folder / PIPELINE_FILE).is_file():
        raise ValueError(f"Hugging Face repo {name} holds no {PIPELINE_FILE}; it is not an AutoSeg pipeline")
    return folder / PIPELINE_FILE


def _forms() -> str:
    return SOURCE_FORMS.format(presets=", ".join(presets()) or "none installed")


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of Hub repo ``repo_id``: from the cache, else downloaded (never when the hub is offline).

    Raises:
        autoseg.models.loading.ModelLoadError: not cached and the hub cannot be used (the message says what to do).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as cached:  # noqa: BLE001 - any miss means: not in the cache
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_reachable()[1]
        if reason:
            raise ModelLoadError(_hub_message(repo_id, reason)) from cached
    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # network, auth and missing-repo errors all mean the same thing to the user
        raise ModelLoadError(_hub_message(repo_id, f"{type(e).__name__}: {str(e)[:300]}")) from e


def _hub_message(repo_id: str, reason: str) -> str:
    return (
        f"pipeline {repo_id!r}: not a local file or folder, not a preset, not in the Hugging Face cache, and the hub "
        f"could not be used ({reason}). On a machine with internet run `hf download {repo_id} --local-dir DIR`, copy "
        "DIR here and load DIR."
    )


def build_pipeline(
    config: PipelineConfig,
    captioner: BlipCaptioner | None = None,
    enhancer: nn.Module | None = None,
    checked: bool = False,
    where: str = "config",
) -> AutoSegPipeline:
    """The one builder: every model of ``config`` loaded (the enhancer included), on one device, in one dtype.

    Args:
        config: the settings.
        captioner: an already loaded BLIP to use instead of ``config.blip`` (e.g. a training module's).
        enhancer: an enhancer head to use instead of ``config.enhancer`` (e.g. the one being trained).
        checked: ``config`` already passed :func:`resolve_config` (skip the checks).
        where: where ``config`` came from, named in messages.

    Raises:
        autoseg.config.ConfigError: a bad setting (unless ``checked``).
        ValueError: an enhancer trained on tokens of another width than BLIP's.
        autoseg.models.loading.ModelLoadError: a model that cannot be loaded.
    """
    if not checked:
        check_runtime(config, where)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    if captioner is None:
        captioner = load_blip(config.blip, device=device, dtype=dtype, compile=config.compile)
    captioner = captioner.to(device=device, dtype=dtype)
    if enhancer is None and config.enhancer is not None:
        enhancer = load_enhancer(config.enhancer)
    if enhancer is not None:
        if enhancer.dim != captioner.hidden_size:
            raise ValueError(
                f"enhancer {config.enhancer or type(enhancer).__name__} was trained on {enhancer.dim}-d BLIP tokens "
                f"but BLIP {config.blip} has {captioner.hidden_size}-d tokens; use the BLIP it was trained with"
            )
        enhancer = enhancer.to(device=device, dtype=dtype).eval()
    return AutoSegPipeline(
        captioner=captioner,
        segmenter=build_segmenter(config.segmenter, device=device, dtype=dtype),
        bboost=BBoost(config.bboost),
        nouns=NounExtractor(config.nouns),
        caption=config.caption,
        scales=config.scales,
        caption_scale=config.caption_scale,
        enhancer=enhancer,
        seed=config.seed,
        max_names=config.max_names,
        batch_size=config.batch_size,
        config=config,
    )


# ---------------------------------------------------------------------------------------------------- saving
def save_pipeline(pipeline: AutoSegPipeline, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``folder/pipeline.yaml`` and every model (``blip/``, ``segmenter/``, ``enhancer.safetensors``).

    The folder is written beside its target and moved into place at the end, so a failure leaves nothing half done.
    The YAML names the models with ``./`` paths (relative to itself) and ``device: auto``; the other settings are the
    pipeline's. Training records (``autoseg_training.json``) of local model folders are kept.

    Args:
        overwrite: replace an existing saved pipeline at ``folder`` (a non-empty folder that is not one is never
            replaced).

    Raises:
        FileExistsError: ``folder`` exists and is not empty (and ``overwrite`` is off, or it is not a saved pipeline).
        ValueError: the pipeline was assembled by hand (no ``config``).
    """
    if pipeline.config is None:
        raise ValueError(
            "this pipeline has no config (it was assembled by hand); build it with autoseg.load to save it"
        )
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{folder}: exists and is not empty; choose a new folder or pass overwrite=True")
        if not (folder / PIPELINE_FILE).is_file():
            raise FileExistsError(f"{folder}: exists and is not a saved pipeline (no {PIPELINE_FILE}); not replaced")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        _write_pipeline(pipeline, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_pipeline(pipeline: AutoSegPipeline, out: Path) -> None:
    config = pipeline.config
    pipeline.captioner.save_pretrained(out / "blip")
    pipeline.segmenter.save_pretrained(out / "segmenter")
    _keep_training_record(config.blip, out / "blip")
    _keep_training_record(config.segmenter.source, out / "segmenter")
    data = to_dict(config)
    data.update(blip="./blip", device="auto", enhancer=None)
    if pipeline.enhancer is not None:
        save_enhancer(pipeline.enhancer, out / "enhancer.safetensors")
        data["enhancer"] = "./enhancer.safetensors"
    data["segmenter"]["source"] = "./segmenter"
    for option in BACKENDS[config.segmenter.name].path_options:  # every model of the backend is in segmenter/
        data["segmenter"][option] = None
    header = "# AutoSeg pipeline written by save_pretrained; load it with autoseg.load(THIS_FOLDER)\n"
    (out / PIPELINE_FILE).write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    (out / "README.md").write_text(_model_card(config), encoding="utf-8")


def _keep_training_record(source: str | None, target: Path) -> None:
    record = Path(source).expanduser() / TRAINING_RECORD if source else None
    if record is not None and record.is_file():
        shutil.copy2(record, target / TRAINING_RECORD)


def _model_card(config: PipelineConfig) -> str:
    return (
        "---\nlibrary_name: autoseg\ntags: [image-segmentation, auto-vocabulary-segmentation]\n---\n"
        "# AutoSeg pipeline\n\n"
        "Auto-vocabulary semantic segmentation: given an image and no class list, it names the things in it and "
        f"segments them. BLIP captioner, `{config.segmenter.name}` segmenter"
        f"{', embedding enhancer' if config.enhancer else ''}; every setting is in `pipeline.yaml`.\n\n"
        '```python\nimport autoseg\n\nseg = autoseg.load("THIS_REPO_OR_FOLDER")\npred = seg("photo.jpg")\n'
        "print(pred.vocabulary)\n```\n"
    )


def push_pipeline(
    pipeline: AutoSegPipeline,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload AutoSeg pipeline",
    revision: str | None = None,
) -> str:
    """Save the pipeline and upload the folder to the Hugging Face model repo ``repo_id`` (created if missing).

    Returns:
        the URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="autoseg_push_") as tmp:
        folder = save_pipeline(pipeline, Path(tmp) / "pipeline")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, repo_type="model"
        )
    return str(getattr(info, "commit_url", info))
