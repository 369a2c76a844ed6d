"""Feedback weights files: safetensors with a JSON metadata header, never pickle.

Layout: tensors ``feedback.<name>`` (the feedback block's state dict) and ``scales``; metadata
(all strings, as safetensors requires):

- ``format`` = ``"ilf-feedback"``, ``format_version``
- ``ilf_config``: the `ILFConfig` as JSON
- ``backbone_class``, ``backbone_config`` (JSON), ``backbone_fingerprint``: sha256 of the
  backbone's class, config and parameter shapes
- ``sampler``: JSON, the solver and step schedule the loop was distilled for
- ``training``: JSON, a free-form training summary
- ``content_sha256``: sha256 over every tensor's name, dtype, shape and bytes, so that a corrupted
  payload is caught even where the safetensors header is intact.
- ``metadata_sha256`` (format version 2): sha256 over the metadata that decides how the tensors are
  used (`COVERED`), so that an edited loop range or schedule is caught too. Version 1 files (the
  first shipped weights) carry none and are read with the tensor checksum alone.

Every field is checked against one schema when read (`read_metadata`): its type, and every number
bounded, with the file and the field named in the error. Tensors must be finite and of plausible
magnitude (`MAX_ABS`) when written and when read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.config import ILFConfig
from ilf_runtime.models import LOOP_ATTR, unwrap_transformer

__all__ = [
    "ILFWeights",
    "WeightsError",
    "backbone_fingerprint",
    "check_tensors",
    "content_hash",
    "load_ilf_weights",
    "metadata_hash",
    "read_metadata",
    "sampler_grid",
    "save_file_atomic",
    "save_ilf_weights",
]

FORMAT = "ilf-feedback"
FORMAT_VERSION = 2
READS = (1, 2)  # format versions this runtime reads
# metadata fields the metadata checksum covers (all but the free-form training summary and the checksums)
COVERED = (
    "format",
    "format_version",
    "ilf_config",
    "backbone_class",
    "backbone_config",
    "backbone_fingerprint",
    "sampler",
)
MAX_ABS = 1e4  # largest plausible magnitude of a feedback weight or scale
# the sampler fields a file may record: name -> (type, inclusive bounds or allowed values)
SAMPLER_FIELDS: dict[str, tuple[type, tuple]] = {
    "num_steps": (int, (1, 10_000)),
    "teacher_steps": (int, (1, 100_000)),
    "guidance_scale": (float, (0.0, 1e4)),
    "solver": (str, ()),
    "loop_steps": (str, ()),
    "grid": (str, ()),  # comma-separated teacher step indices (a non-uniform grid on teacher_steps)
}


class WeightsError(ValueError):
    """A feedback weights file that cannot be used: unreadable, corrupted or for another backbone."""


def _backbone_config(transformer: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}


def backbone_fingerprint(transformer: nn.Module) -> str:
    """sha256 of the backbone class, config and parameter shapes (ILF's own parameters excluded)."""
    shapes = [
        (n, list(p.shape)) for n, p in transformer.named_parameters() if not n.startswith(LOOP_ATTR + ".")
    ]
    blob = json.dumps(
        {"class": type(transformer).__name__, "config": _backbone_config(transformer), "params": shapes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (names sorted)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class ILFWeights:
    """A loaded feedback weights file."""

    config: ILFConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def sampler(self) -> dict[str, Any]:
        return self.metadata.get("sampler") or {}

    def check_backbone(self, transformer: nn.Module, strict: bool = True) -> None:
        """Raises `WeightsError` unless the file was made for this backbone."""
        want_cls = self.metadata.get("backbone_class")
        got_cls = type(transformer).__name__
        if want_cls != got_cls:
            raise WeightsError(f"{self._name()}: made for a {want_cls} backbone, got a {got_cls}")
        want_fp = self.metadata.get("backbone_fingerprint")
        got_fp = backbone_fingerprint(transformer)
        if strict and want_fp != got_fp:
            want_cfg = self.metadata.get("backbone_config") or {}
            got_cfg = _backbone_config(transformer)
            diffs = [
                f"{k}: expected {want_cfg.get(k)!r}, found {got_cfg.get(k)!r}"
                for k in sorted(set(want_cfg) | set(got_cfg))
                if json.dumps(want_cfg.get(k), default=str) != json.dumps(got_cfg.get(k), default=str)
            ]
            detail = "; ".join(diffs) if diffs else "same config, different parameter shapes"
            raise WeightsError(
                f"{self._name()}: made for another backbone (fingerprint {str(want_fp)[:12]}, "
                f"this one is {got_fp[:12]}): {detail}"
            )

    def load_into(self, loop: nn.Module) -> None:
        """Copies the tensors into a `FeedbackLoop`, checking names and shapes first."""
        expected = {f"feedback.{k}": v for k, v in loop.feedback.state_dict().items()}
        expected["scales"] = loop.scales
        missing = sorted(set(expected) - set(self.tensors))
        unexpected = sorted(set(self.tensors) - set(expected))
        if missing:
            raise WeightsError(
                f"{self._name()}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        if unexpected:
            raise WeightsError(f"{self._name()}: unexpected tensors {unexpected[:5]}")
        for name, ref in expected.items():
            if tuple(self.tensors[name].shape) != tuple(ref.shape):
                raise WeightsError(
                    f"{self._name()}: tensor {name!r} has shape {tuple(self.tensors[name].shape)}, "
                    f"expected {tuple(ref.shape)}"
                )
        with torch.no_grad():
            loop.feedback.load_state_dict(
                {k[len("feedback.") :]: v for k, v in self.tensors.items() if k.startswith("feedback.")}
            )
            loop.scales.copy_(self.tensors["scales"])

    def _name(self) -> str:
        return f"feedback weights {self.path}" if self.path else "feedback weights"


def save_ilf_weights(
    path: str | PathLike,
    model: Any,
    *,
    sampler: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Writes the loop attached to `model` (a transformer or pipeline) atomically to `path`."""
    transformer = unwrap_transformer(model)
    loop = getattr(transformer, LOOP_ATTR, None)  # the `ilf.FeedbackLoop` apply_ilf registered
    if loop is None:
        raise RuntimeError("no ILF loop is applied to this model; nothing to save")
    tensors = {f"feedback.{k}": v.detach().contiguous().cpu() for k, v in loop.feedback.state_dict().items()}
    tensors["scales"] = loop.scales.detach().contiguous().cpu()
    check_tensors(tensors, f"feedback weights {path} (not written)")
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ilf_config": loop.config.to_json(),
        "backbone_class": type(transformer).__name__,
        "backbone_config": json.dumps(_backbone_config(transformer), sort_keys=True, default=str),
        "backbone_fingerprint": backbone_fingerprint(transformer),
        "sampler": json.dumps(sampler or {}, sort_keys=True),
        "training": json.dumps(training or {}, sort_keys=True),
        "content_sha256": content_hash(tensors),
    }
    decoded = {k: json.loads(meta[k]) for k in ("ilf_config", "backbone_config", "sampler")}
    meta["metadata_sha256"] = metadata_hash(meta | decoded)
    return save_file_atomic(tensors, path, meta)


def save_file_atomic(
    tensors: dict[str, torch.Tensor], path: str | PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Writes a safetensors file through a temporary file and a rename: an interrupted write
    leaves the previous file (or none), never a truncated one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def metadata_hash(meta: dict[str, Any]) -> str:
    """sha256 over the `COVERED` metadata fields, JSON fields decoded (so the text layout does not matter)."""
    blob = json.dumps({k: meta.get(k) for k in COVERED}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raises `WeightsError` unless every tensor is finite and within `MAX_ABS`."""
    for name in sorted(tensors):
        t = tensors[name].detach()
        if not t.is_floating_point() or not t.numel():
            continue
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(
                f"{where}: tensor {name!r} has {bad} NaN or Inf values; expected finite weights"
            )
        peak = float(t.abs().max())
        if peak > MAX_ABS:
            raise WeightsError(
                f"{where}: tensor {name!r} reaches {peak:.3g}; expected magnitudes up to {MAX_ABS:g} "
                "(a diverged training run?)"
            )


def _type_name(v: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a string", type(None): "nothing"}.get(
        type(v), type(v).__name__
    )


def sampler_grid(sampler: dict[str, Any]) -> dict[str, Any]:
    """The ``grid`` and ``grid_steps`` arguments of `pipelines.sample` that a file's sampler record
    asks for (a non-uniform grid on its teacher's steps); {} for the scheduler's own spacing."""
    spec = sampler.get("grid")
    if not spec:
        return {}
    return {"grid": [int(v) for v in spec.split(",")], "grid_steps": int(sampler.get("teacher_steps") or 20)}


def _check_sampler(sampler: dict[str, Any], where: str) -> None:
    if sampler.get("grid"):
        from ilf_runtime.solvers import check_grid

        try:
            starts = check_grid(str(sampler["grid"]).split(","), int(sampler.get("teacher_steps") or 20))
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{where}: metadata 'sampler.grid': {e}") from None
        if len(starts) != sampler.get("num_steps", len(starts)):
            raise WeightsError(
                f"{where}: metadata 'sampler.grid' has {len(starts)} steps, 'sampler.num_steps' is "
                f"{sampler.get('num_steps')}"
            )
    for key, (typ, allowed) in SAMPLER_FIELDS.items():
        if key not in sampler:
            continue
        v = sampler[key]
        ok = isinstance(v, typ) or (typ is float and isinstance(v, int))
        if isinstance(v, bool) or not ok:
            raise WeightsError(f"{where}: metadata 'sampler.{key}' must be {typ.__name__}, found {v!r}")
        if typ is not str and not (math.isfinite(v) and allowed[0] <= v <= allowed[1]):
            raise WeightsError(
                f"{where}: metadata 'sampler.{key}' must be in {allowed[0]}..{allowed[1]}, found {v!r}"
            )


def read_metadata(path: str | PathLike) -> dict[str, Any]:
    """The metadata header of a weights file, JSON fields decoded and every field checked against
    the schema (types, bounds, the `ILFConfig`, the metadata checksum); reads no tensor data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    where = f"feedback weights {path}"
    if not path.is_file():
        raise WeightsError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{where}: not a readable safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        raise WeightsError(f"{where}: metadata 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    version = raw.get("format_version", "")
    if not (version.isdigit() and int(version) in READS):
        raise WeightsError(
            f"{where}: metadata 'format_version' is {version!r}, this runtime reads "
            + " or ".join(map(str, READS))
        )
    meta: dict[str, Any] = dict(raw)
    for key in ("ilf_config", "backbone_config", "sampler", "training"):
        try:
            meta[key] = json.loads(raw.get(key, "{}" if key == "training" else "null"))
        except json.JSONDecodeError:
            raise WeightsError(f"{where}: metadata {key!r} is not valid JSON") from None
        if not isinstance(meta[key], dict):
            raise WeightsError(
                f"{where}: metadata {key!r} must be a JSON object, found {_type_name(meta[key])}"
            )
    checksums = ("content_sha256", "metadata_sha256") if int(version) >= 2 else ("content_sha256",)
    for key in ("backbone_class", "backbone_fingerprint", *checksums):
        if not raw.get(key):
            raise WeightsError(f"{where}: metadata {key!r} is missing")
    _check_sampler(meta["sampler"], where)
    try:
        ILFConfig.from_dict(meta["ilf_config"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: invalid ilf_config ({e})") from None
    if int(version) >= 2 and raw["metadata_sha256"] != metadata_hash(meta):
        raise WeightsError(
            f"{where}: metadata checksum mismatch (expected {raw['metadata_sha256'][:12]}, found "
            f"{metadata_hash(meta)[:12]}): the loop range, schedule or backbone fields were edited or corrupted"
        )
    return meta


def load_ilf_weights(path: str | PathLike) -> ILFWeights:
    """Reads and verifies a weights file (header schema, checksums, finite tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_metadata(path)
    where = f"feedback weights {path}"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{where}: tensor data unreadable, truncated or corrupted ({e})") from None
    got = content_hash(tensors)
    if meta.get("content_sha256") != got:
        raise WeightsError(
            f"{where}: content checksum mismatch (expected {str(meta.get('content_sha256'))[:12]}, "
            f"found {got[:12]}): the file is corrupted"
        )
    if "scales" not in tensors:
        raise WeightsError(f"{where}: missing tensors ['scales']")
    check_tensors(tensors, where)
    return ILFWeights(
        config=ILFConfig.from_dict(meta["ilf_config"]), tensors=tensors, metadata=meta, path=str(path)
    )
