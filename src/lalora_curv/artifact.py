"""The precision artifact: ``precision.safetensors`` + ``precision.json`` in one directory.

* ``precision.safetensors``: every tensor (contiguous, no pickle, sorted by name); its header
  metadata carries ``format = lalora-curv/precision/<format version>``, so a foreign file is
  recognised.
* ``precision.json``: sorted, indented metadata: kind, format and library versions, structure,
  backend, estimator, counts, modules with shapes, adapter config, base model, sources, date,
  the SHA-256 of the tensor file (a torn or mixed-up pair is detected) and, from format
  version 2, ``metadata_sha256``: the SHA-256 of the metadata itself (all of it but that
  field, in its canonical form), so that any edit of the JSON is refused too. Version 1
  artifacts (no metadata digest) still load, with a warning.
* Byte-identical tensors (the input factor of modules reading the same input, equal zero
  ``B0``) are stored once; ``tensor_aliases`` maps the others to the stored name. The storage
  of the structure's tensors (dense float32/float64/bfloat16, or low rank + diagonal for the
  K-FAC factors: :meth:`~lalora_curv.precision.Precision.with_storage`) is recorded as ``storage``
  and checked against the tensors on load.

Saving is atomic (:func:`lalora_curv.atomic.staged_dir`): both files are written into a fresh
sibling directory which then replaces ``path`` by renames, so an interrupted save leaves the
old artifact or none, never a half; the next save cleans what an interrupted one left, and a
load that finds no artifact but the previous one moved aside says where it is. A save
refuses a non-finite precision and a folder holding files a precision does not write.
Loading validates everything (:func:`load_precision`) and raises
:class:`~lalora_curv.errors.ArtifactError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lalora_curv._version import __version__
from lalora_curv.adapter import LoraModuleSpec
from lalora_curv.atomic import leftovers, staged_dir, write_bytes
from lalora_curv.errors import ArtifactError, LaloraError
from lalora_curv.precision import REGISTRY, Precision
from lalora_curv.precision.metadata import PrecisionMetadata

KIND = "lalora-curv/precision"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no metadata digest
#: a dense K-FAC factor ``F`` loads only if ``max |F - F^T| <= SYMMETRY_RTOL max |F|`` and
#: (for ``D <= FULL_PSD_CHECK_MAX_DIM``) ``lambda_min(F) >= -u ||F||_F``, ``u`` the rounding
#: unit of its storage (:data:`PSD_RTOL`: rounding each entry by ``u`` relative moves every
#: eigenvalue by at most ``u ||F||_F``); larger factors are held to the PSD conditions of every
#: 2 x 2 principal minor, ``F_ii >= -u max|F|`` and ``F_ij^2 <= F_ii F_jj (1 + 4u)^2``
#: (which a negated or corrupted factor breaks)
SYMMETRY_RTOL = 1e-6
PSD_RTOL = {torch.bfloat16: 2.0**-8, torch.float32: 1e-5, torch.float64: 1e-12}
FULL_PSD_CHECK_MAX_DIM = 2048
TENSORS_FILE = "precision.safetensors"
METADATA_FILE = "precision.json"

#: the artifact's own keys of ``precision.json``; the rest is the precision's metadata, whose
#: one schema is :class:`~lalora_curv.precision.metadata.PrecisionMetadata`
ARTIFACT_KEYS = frozenset(
    {"kind", "format_version", "modules", "tensors_sha256", "tensor_aliases", "metadata_sha256"}
)
#: keys this format version defines; others (from newer versions) are dropped on load
KNOWN_KEYS = ARTIFACT_KEYS | PrecisionMetadata.fields()
#: the files a precision writes: a folder holding others is not replaced by a save
OWN_FILES = frozenset({"precision.safetensors", "precision.json"})


def _dumps(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``metadata_sha256`` field."""
    return hashlib.sha256(
        _dumps({k: v for k, v in meta.items() if k != "metadata_sha256"})
    ).hexdigest()


def deduplicate(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of byte-identical content (same dtype, shape and bytes) stored once.

    Returns the tensors to store and ``{alias: stored name}`` for the others; the stored one is
    the first name in sorted order. Identity is checked on the content (SHA-256 of the bytes,
    confirmed by comparing them), never inferred from names.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
        key = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy()).hexdigest())
        for other in seen.get(key, []):
            if torch.equal(raw, stored[other].reshape(-1).view(torch.uint8)):
                aliases[name] = other
                break
        else:
            stored[name] = t
            seen.setdefault(key, []).append(name)
    return stored, aliases


def save_precision(prec: Precision, path: str | Path, *, dedup: bool = True) -> Path:
    """Save ``prec`` as the directory ``path`` (created or atomically replaced).

    ``dedup``: store byte-identical tensors once (see :func:`deduplicate`).

    Raises:
        ArtifactError: a tensor of ``prec`` is not finite, its metadata holds a non-finite
            number, or ``path`` is a folder holding files a precision does not write.
    """
    path = Path(path)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in sorted(prec.all_tensors().items())}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(
                f"cannot save: tensor {name!r} has NaN/inf entries (an overflowed scaling such "
                "as 1e39 * prec in float32?); such a precision could not be loaded again"
            )
    weights = prec.metadata.get("component_weights")
    if weights is not None and not bool(
        torch.isfinite(torch.tensor(weights, dtype=prec.dtype)).all()
    ):
        raise ArtifactError(
            f"cannot save: the component weights {weights} overflow the precision's "
            f"{prec.dtype} (an overflowed scaling such as 1e39 * prec?)"
        )
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{path} exists and is not a directory; not overwriting")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise ArtifactError(
                f"{path} holds files a precision does not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): a save replaces the whole folder, "
                "so save the precision into its own folder"
            )
    aliases: dict[str, str] = {}
    if dedup:
        tensors, aliases = deduplicate(tensors)
    else:  # safetensors refuses tensors sharing memory: give each its own copy
        seen: set[int] = set()
        for n, t in tensors.items():
            if t.untyped_storage().data_ptr() in seen:
                tensors[n] = t.clone()
            seen.add(tensors[n].untyped_storage().data_ptr())
    # one header key: safetensors does not keep the order of several, and saves must be stable
    blob = st_save(tensors, metadata={"format": f"{KIND}/{FORMAT_VERSION}"})
    meta = prec.metadata
    if aliases:
        meta["tensor_aliases"] = aliases
    meta.update(
        {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "library_version": meta.get("library_version", __version__),
            "modules": [{"name": n, **s.to_json()} for n, s in prec.modules.items()],  # model order
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }
    )
    try:
        meta["metadata_sha256"] = metadata_digest(meta)
        text = _dumps(meta)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"cannot save: the metadata is not finite JSON ({e})") from None
    with staged_dir(path) as staging:
        write_bytes(staging / TENSORS_FILE, blob)
        write_bytes(staging / METADATA_FILE, text)
    return path


def load_precision(path: str | Path) -> Precision:
    """Load and validate a precision saved by :func:`save_precision`.

    Raises:
        ArtifactError: missing, truncated, corrupt or foreign files, unknown format version,
            non-finite tensors, tensors that do not match the metadata.
    """
    path = Path(path)
    if not path.is_dir():
        moved = leftovers(path)["old"]
        if moved:
            raise ArtifactError(
                f"{path}: no such precision directory, but {moved[-1]} holds the artifact "
                "that was there before an interrupted save: rename it back to use it"
            )
        raise ArtifactError(f"{path}: no such precision directory")
    meta_path, tensor_path = path / METADATA_FILE, path / TENSORS_FILE
    for f in (meta_path, tensor_path):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing")
    meta = _read_metadata(meta_path)
    tensors = _read_tensors(tensor_path, meta)
    _check_metadata_values(meta, meta_path)
    _resolve_aliases(meta.pop("tensor_aliases", {}), tensors, meta_path, tensor_path)
    structure = meta.get("structure")
    if structure not in REGISTRY:
        raise ArtifactError(f"{meta_path}: unknown structure {structure!r}")
    try:
        modules = {d["name"]: LoraModuleSpec.from_json(d["name"], d) for d in meta["modules"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{meta_path}: malformed 'modules' entry ({e!r})") from None
    mode = _mode_of(modules, tensors, tensor_path)
    precision_meta = {k: v for k, v in meta.items() if k not in ARTIFACT_KEYS}
    try:
        prec = REGISTRY[structure].from_tensors(modules, mode, tensors, precision_meta)
    except ArtifactError as e:
        raise ArtifactError(f"{tensor_path}: {e}") from None
    except LaloraError as e:
        raise ArtifactError(f"{path}: inconsistent artifact ({e})") from None
    extra = sorted(set(tensors) - set(prec.all_tensors()))
    if extra:
        raise ArtifactError(
            f"{tensor_path}: unexpected tensor {extra[0]!r} for structure {structure!r}"
        )
    if meta.get("storage") is not None and meta["storage"] != prec.metadata.get("storage"):
        raise ArtifactError(
            f"{meta_path}: 'storage' says {meta['storage']!r} but the tensors are stored as "
            f"{prec.metadata.get('storage')!r}"
        )
    check_values(prec, tensor_path)
    return prec


def _read_metadata(meta_path: Path) -> dict[str, Any]:
    """Read and check ``precision.json``.

    Finite JSON of this kind and a readable format version, matching its digest (format 2);
    keys of a newer format dropped with a warning.
    """
    try:
        meta = json.loads(
            meta_path.read_text(), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{meta_path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ArtifactError(
            f"{meta_path}: not a lalora-curv precision (kind "
            f"{meta.get('kind') if isinstance(meta, dict) else None!r})"
        )
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{meta_path}: unknown format version {version!r} (this is "
            f"lalora-curv {__version__}, formats {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if version >= 2 and meta.get("metadata_sha256") != metadata_digest(meta):
        raise ArtifactError(
            f"{meta_path}: the metadata does not match its digest (metadata_sha256): the file "
            "was edited or corrupted; re-save the precision from its source"
        )
    if version == 1:
        warnings.warn(
            f"{meta_path}: a format-1 artifact, whose metadata no digest covers; save it "
            "again to protect it (format 2)",
            stacklevel=3,
        )
    unknown = sorted(set(meta) - KNOWN_KEYS)
    if unknown:
        warnings.warn(
            f"{meta_path}: dropping unknown metadata keys {unknown} (written by a "
            "newer lalora-curv?)",
            stacklevel=3,
        )
        meta = {k: v for k, v in meta.items() if k in KNOWN_KEYS}
    return meta


def _read_tensors(tensor_path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read and check ``precision.safetensors``.

    Written by lalora-curv, the bytes the metadata's SHA-256 names, every floating tensor
    finite.
    """
    blob = tensor_path.read_bytes()
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{tensor_path}: corrupt or truncated safetensors file ({e})") from None
    header = _safetensors_header(blob)
    if not str(header.get("format", "")).startswith(f"{KIND}/"):
        raise ArtifactError(
            f"{tensor_path}: a safetensors file not written by lalora-curv "
            f"(header format {header.get('format')!r})"
        )
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise ArtifactError(
            f"{tensor_path}: does not match {METADATA_FILE} (SHA-256 differs: "
            "corrupt, or files from different saves)"
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{tensor_path}: tensor {name!r} has NaN/inf entries")
    return tensors


def _resolve_aliases(
    aliases: Any, tensors: dict[str, torch.Tensor], meta_path: Path, tensor_path: Path
) -> None:
    """Add the deduplicated tensors (``alias -> stored name``) to ``tensors``."""
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ArtifactError(f"{meta_path}: 'tensor_aliases' must map tensor names to names")
    for alias, target in aliases.items():
        if alias in tensors:
            raise ArtifactError(f"{tensor_path}: tensor {alias!r} is both stored and an alias")
        if target not in tensors:
            raise ArtifactError(
                f"{meta_path}: alias {alias!r} refers to {target!r}, which is not stored"
            )
        tensors[alias] = tensors[target]


def _mode_of(
    modules: dict[str, LoraModuleSpec], tensors: dict[str, torch.Tensor], tensor_path: Path
) -> dict[str, torch.Tensor]:
    """The mode ``mu``: every module's ``lora_A``/``lora_B`` tensor, of its spec's shape."""
    mode = {}
    for spec in modules.values():
        for name, shape in (
            (spec.lora_A_name, (spec.rank, spec.in_features)),
            (spec.lora_B_name, (spec.out_features, spec.rank)),
        ):
            key = f"mode.{name}"
            if key not in tensors:
                raise ArtifactError(f"{tensor_path}: tensor {key!r} is missing")
            if tuple(tensors[key].shape) != shape:
                raise ArtifactError(
                    f"{tensor_path}: tensor {key!r} has shape "
                    f"{tuple(tensors[key].shape)}, expected {shape}"
                )
            mode[name] = tensors[key]
    return mode


#: tensor kinds (the name before the first dot) that must be >= 0: diagonals, eigenvalues,
#: isotropic weights, the non-negative parts of low-rank factors
NON_NEGATIVE = frozenset(
    {
        "diag",
        "weight_diag",
        "eigenvalues",
        "isotropic",
        "merged_isotropic",
        "input_cov_eigvals",
        "grad_cov_eigvals",
        "input_cov_diag",
        "grad_cov_diag",
    }
)


def check_values(prec: Precision, where: Path | str) -> None:
    """Check what makes a precision a precision, so that no penalty is negative.

    One floating dtype for the mode, non-negative diagonals and eigenvalues, and symmetric
    positive semi-definite dense K-FAC factors (tolerances :data:`SYMMETRY_RTOL`,
    :data:`PSD_RTOL`).
    """
    dtypes = {t.dtype for t in prec.mode.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ArtifactError(f"{where}: the mode tensors must share one float dtype, got {dtypes}")
    weights = prec.metadata.get("component_weights")
    if weights is not None and not bool(
        torch.isfinite(torch.tensor(weights, dtype=prec.dtype)).all()
    ):
        raise ArtifactError(f"{where}: component weights {weights} overflow {prec.dtype}")
    for name, t in prec.structure_tensors().items():
        kind = name.split(".", 1)[0]
        if kind in NON_NEGATIVE and bool((t < 0).any()):
            raise ArtifactError(f"{where}: tensor {name!r} has negative entries")
        if kind in ("input_cov", "grad_cov"):
            _check_psd(name, t.double(), PSD_RTOL.get(t.dtype, 1e-5), where)


def _check_psd(name: str, stack: torch.Tensor, u: float, where: Path | str) -> None:
    for k, F in enumerate(stack):
        scale = float(F.abs().max())
        if scale == 0.0:
            continue
        if float((F - F.T).abs().max()) > SYMMETRY_RTOL * scale:
            raise ArtifactError(f"{where}: factor {name!r}[{k}] is not symmetric")
        d = F.diagonal()
        if bool((d < -u * scale).any()):
            raise ArtifactError(f"{where}: factor {name!r}[{k}] has a negative diagonal (not PSD)")
        if F.shape[0] <= FULL_PSD_CHECK_MAX_DIM:
            eig = torch.linalg.eigvalsh(F)
            if float(eig[0]) < -u * float(F.norm()):
                raise ArtifactError(
                    f"{where}: factor {name!r}[{k}] is not positive semi-definite (smallest "
                    f"eigenvalue {float(eig[0]):.3e}, largest {float(eig[-1]):.3e})"
                )
        else:
            dd = d.clamp(min=0)
            if bool((F.square() > torch.outer(dd, dd) * (1 + 4 * u) ** 2 + 1e-30).any()):
                raise ArtifactError(
                    f"{where}: factor {name!r}[{k}] is not positive semi-definite (an entry "
                    "exceeds the geometric mean of its diagonal entries)"
                )


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in metadata")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"non-finite number {text} in metadata")
    return value


def _check_metadata_values(meta: dict[str, Any], where: Path) -> None:
    """Check the precision's metadata against its schema, then the modules.

    The schema is :meth:`PrecisionMetadata.from_json`: types, counts >= 0, a positive finite
    scale or null, component weights >= 0.
    """
    PrecisionMetadata.from_json(
        {k: v for k, v in meta.items() if k not in ARTIFACT_KEYS}, where=str(where)
    )
    modules = meta.get("modules")
    if not isinstance(modules, list) or not modules:
        raise ArtifactError(f"{where}: 'modules' must be a non-empty list")
    for m in modules:
        ok = isinstance(m, dict) and isinstance(m.get("name"), str)
        ok = ok and all(
            isinstance(m.get(k), int) and m[k] > 0 for k in ("in_features", "out_features", "rank")
        )
        ok = ok and isinstance(m.get("scaling"), int | float) and m["scaling"] > 0
        if not ok:
            raise ArtifactError(f"{where}: malformed module entry {m!r}")


def _safetensors_header(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__", {}) or {}
