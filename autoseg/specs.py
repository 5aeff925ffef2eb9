"""Dataset specs: one JSON file per public dataset in ``datasets_spec/``, loaded and checked.

A spec says what a dataset is (modality, channels, labels and regions), where it comes from
(download address, licence, citation) and how its download is laid out on disk
(``source_layout.family`` picks the converter in :mod:`autoseg.convert`, the other
``source_layout`` keys are that family's options). ``datasets_spec/schema.json`` is the
JSON Schema (draft 2020-12) of these files and the single source of truth for their structure.

``jsonschema`` is not a dependency, so :func:`schema_problems` checks an instance against the
subset of JSON Schema that ``schema.json`` uses and refuses any keyword it does not know (a new
keyword added to the schema must be implemented here rather than silently ignored). On top of the
schema, :func:`validate_spec` checks what a schema cannot say: channel indices without gaps,
regions and ``regions_class_order`` agreeing, label mappings landing on declared values, and the
``dataset.json`` the spec produces passing :func:`autoseg.dataset.parse_dataset_json`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.dataset import DatasetError, label_values_of, parse_dataset_json

SPEC_DIR = Path(__file__).resolve().parents[1] / "datasets_spec"
SCHEMA_FILE = "schema.json"

# Families whose files are volumes and those whose files are single 2D images.
FAMILY_DIMENSIONALITY = {"msd": 3, "brats2021": 3, "kits23": 3, "acdc": 3, "isbi2012": 2}
NATURAL_2D_ENDINGS = (".png", ".bmp")

# Keywords that only document a schema; they never make an instance invalid.
_ANNOTATIONS = {"$schema", "$id", "$comment", "$defs", "title", "description", "examples", "default"}


class SpecError(DatasetError):
    """A spec cannot be used; ``problems`` lists every reason, each naming the file and key.

    A :class:`~autoseg.dataset.DatasetError`, so the CLI reports it like any dataset problem.
    """


@dataclass(frozen=True)
class SourceLayout:
    """How a dataset's download is organised: the family (converter) and its options."""

    family: str
    tree: str
    label_mapping: dict[int, int] = field(default_factory=dict)
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A checked dataset spec (see ``datasets_spec/README.md`` for every field)."""

    name: str
    description: str
    modality: str
    dimensionality: int
    channel_names: dict[str, str]
    labels: dict[str, int | tuple[int, ...]]
    regions_class_order: tuple[int, ...] | None
    file_ending: str
    source_layout: SourceLayout
    license: str
    download: dict[str, str]
    reference: str
    num_training_approx: int
    path: Path | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> set[int]:
        """Every value a converted label file may contain."""
        return label_values_of(self.labels)

    def dataset_json(self, num_training: int) -> dict:
        """The raw dataset's ``dataset.json`` for ``num_training`` converted training cases."""
        data: dict = {
            "name": self.name,
            "description": self.description,
            "channel_names": dict(self.channel_names),
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()},
        }
        if self.regions_class_order is not None:
            data["regions_class_order"] = list(self.regions_class_order)
        data.update({
            "numTraining": num_training,
            "file_ending": self.file_ending,
            "licence": self.license,
            "reference": self.reference,
        })
        return data


# --- finding and loading -----------------------------------------------------------------------------


def spec_dir() -> Path:
    """The repository's ``datasets_spec/`` folder (specs and ``schema.json``)."""
    return SPEC_DIR


def available_specs(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of the specs in ``folder`` (default: the repository's ``datasets_spec/``)."""
    folder = Path(folder) if folder is not None else SPEC_DIR
    return sorted(p.stem for p in folder.glob("*.json") if p.name != SCHEMA_FILE and not p.name.startswith("."))


def load_schema(folder: str | os.PathLike | None = None) -> dict:
    """The JSON Schema of spec files (``schema.json``)."""
    path = (Path(folder) if folder is not None else SPEC_DIR) / SCHEMA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError([f"{path}: spec schema is missing"]) from None
    except json.JSONDecodeError as error:
        raise SpecError([f"{path}: not valid JSON ({error})"]) from None


def resolve_spec_path(path_or_name: str | os.PathLike) -> Path:
    """A spec file from a path, or from a name such as ``"BraTS2021"`` (case-insensitive)."""
    candidate = Path(path_or_name)
    if candidate.is_file():
        return candidate
    if candidate.suffix == ".json" or len(candidate.parts) > 1:
        raise SpecError([f"{candidate}: spec file does not exist"])
    by_name = {name.lower(): name for name in available_specs()}
    name = by_name.get(str(path_or_name).lower())
    if name is None:
        raise SpecError([f"{path_or_name!r} is neither a spec file nor a spec name in {SPEC_DIR}; "
                         f"known names: {', '.join(by_name.values()) or '(none)'}"])
    return SPEC_DIR / f"{name}.json"


def load_spec(path_or_name: str | os.PathLike) -> DatasetSpec:
    """Read and check a spec given as a path or as a name in ``datasets_spec/``.

    Raises:
        SpecError: listing every problem, each naming the file and the key.
    """
    path = resolve_spec_path(path_or_name)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecError([f"{path}: not valid JSON ({error})"]) from None
    problems = validate_spec(data, source=str(path))
    if problems:
        raise SpecError(problems)
    return _build_spec(data, path)


def validate_spec(data: object, schema: dict | None = None, source: str = "spec") -> list[str]:
    """Every problem with a loaded spec: its schema first, then the rules the schema cannot express."""
    schema = schema if schema is not None else load_schema()
    problems = [f"{source}: {p}" for p in schema_problems(data, schema)]
    if problems:
        # Cross-field rules assume a well-formed document; they would only repeat the same faults.
        return problems
    return [f"{source}: {p}" for p in _semantic_problems(data)]  # type: ignore[arg-type]


def _build_spec(data: dict, path: Path | None) -> DatasetSpec:
    layout = dict(data["source_layout"])
    family = layout.pop("family")
    tree = layout.pop("tree")
    mapping = {int(k): int(v) for k, v in layout.pop("label_mapping", {}).items()}
    order = data.get("regions_class_order")
    return DatasetSpec(
        name=data["name"],
        description=data["description"],
        modality=data["modality"],
        dimensionality=data["dimensionality"],
        channel_names=dict(data["channel_names"]),
        labels={k: tuple(v) if isinstance(v, list) else v for k, v in data["labels"].items()},
        regions_class_order=tuple(order) if order is not None else None,
        file_ending=data["file_ending"],
        source_layout=SourceLayout(family, tree, mapping, layout),
        license=data["license"],
        download=dict(data["download"]),
        reference=data["reference"],
        num_training_approx=data["num_training_approx"],
        path=path,
    )


def _semantic_problems(data: dict) -> list[str]:
    problems: list[str] = []
    indices = sorted(int(k) for k in data["channel_names"])
    if indices != list(range(len(indices))):
        problems.append(f"channel_names: indices must be 0..{len(indices) - 1} without gaps, found {indices}")

    labels = data["labels"]
    plain = [v for k, v in labels.items() if isinstance(v, int) and k != "ignore"]
    if len(plain) != len(set(plain)):
        problems.append(f"labels: plain label values must be unique, found {sorted(plain)}")
    has_regions = any(isinstance(v, list) for v in labels.values())
    order = data.get("regions_class_order")
    values = {x for v in labels.values() for x in (v if isinstance(v, list) else [v])}
    if has_regions and order is None:
        problems.append("regions_class_order: required when labels define regions (lists of values)")
    if order is not None:
        if not has_regions:
            problems.append("regions_class_order: only meaningful when labels define regions (lists of values)")
        n_regions = len([k for k in labels if k not in ("background", "ignore")])
        if len(order) != n_regions:
            problems.append(f"regions_class_order: has {len(order)} entries but labels define {n_regions} regions")
        if not set(order) <= values:
            problems.append(f"regions_class_order: values {sorted(set(order) - values)} are not label values")

    layout = data["source_layout"]
    for source_value, target in layout.get("label_mapping", {}).items():
        if target not in values:
            problems.append(f"source_layout.label_mapping.{source_value}: maps to {target}, "
                            f"which is not a label value {sorted(values)}")

    family = layout["family"]
    if data["dimensionality"] != FAMILY_DIMENSIONALITY[family]:
        problems.append(f"dimensionality: the {family!r} family produces {FAMILY_DIMENSIONALITY[family]}D "
                        f"images, not {data['dimensionality']}D")
    if data["dimensionality"] == 3 and data["file_ending"] in NATURAL_2D_ENDINGS:
        problems.append(f"file_ending: {data['file_ending']} holds 2D images only; use .nii.gz for 3D")
    if "channel_files" in layout and len(layout["channel_files"]) != len(data["channel_names"]):
        problems.append(f"source_layout.channel_files: {len(layout['channel_files'])} file(s) for "
                        f"{len(data['channel_names'])} channel(s) in channel_names")
    if family == "isbi2012" and len(data["channel_names"]) != 1:
        problems.append("channel_names: the 'isbi2012' family has exactly one channel")

    if not problems:
        _, dataset_problems = parse_dataset_json(_build_spec(data, None).dataset_json(1), "resulting dataset.json")
        problems += dataset_problems
    return problems


# --- a JSON Schema subset ----------------------------------------------------------------------------


def schema_problems(instance: object, schema: dict) -> list[str]:
    """Check ``instance`` against ``schema`` (the JSON Schema subset ``schema.json`` uses).

    Returns one message per problem, each starting with the dotted key path (e.g.
    ``source_layout.family: 'foo' is not one of [...]``). Supported keywords: ``type enum const
    properties required additionalProperties patternProperties propertyNames minProperties items
    minItems minimum minLength pattern anyOf allOf if/then $ref`` (local ``#/$defs/...`` only).

    Raises:
        ValueError: the schema uses a keyword this checker does not implement.
    """
    return _check(instance, schema, schema, "")


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,), "null": (type(None),),
    "number": (int, float), "integer": (int,),
}


def _type_ok(value: object, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _where(path: str) -> str:
    return path if path else "(top level)"


def _check(value: object, schema: dict, root: dict, path: str) -> list[str]:
    unknown = set(schema) - _ANNOTATIONS - set(_KEYWORDS)
    if unknown:
        raise ValueError(f"spec schema keyword(s) {sorted(unknown)} at {_where(path)} are not supported "
                         "by autoseg.specs.schema_problems")
    problems: list[str] = []
    for keyword in _KEYWORD_ORDER:
        if keyword in schema:
            problems += _KEYWORDS[keyword](value, schema, root, path)
            if keyword in ("$ref", "type") and problems:
                break  # nothing else is meaningful for a value of the wrong type
    return problems


def _kw_ref(value, schema, root, path):
    ref = schema["$ref"]
    if not ref.startswith("#/"):
        raise ValueError(f"spec schema $ref {ref!r}: only local references (#/...) are supported")
    target = root
    for part in ref[2:].split("/"):
        target = target[part]
    return _check(value, target, root, path)


def _kw_type(value, schema, root, path):
    names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if any(_type_ok(value, n) for n in names):
        return []
    return [f"{_where(path)}: expected {' or '.join(names)}, found {type(value).__name__} {value!r}"]


def _kw_enum(value, schema, root, path):
    if any(value == v and type(value) is type(v) for v in schema["enum"]):
        return []
    return [f"{_where(path)}: {value!r} is not one of {schema['enum']}"]


def _kw_const(value, schema, root, path):
    if value == schema["const"] and type(value) is type(schema["const"]):
        return []
    return [f"{_where(path)}: must be {schema['const']!r}, found {value!r}"]


def _kw_required(value, schema, root, path):
    if not isinstance(value, dict):
        return []
    prefix = f"{path}: " if path else ""
    return [f"{prefix}missing required key {key!r}" for key in schema["required"] if key not in value]


def _child(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _kw_properties(value, schema, root, path):
    if not isinstance(value, dict):
        return []
    problems: list[str] = []
    for key, sub in schema["properties"].items():
        if key in value:
            problems += _check(value[key], sub, root, _child(path, key))
    return problems


def _kw_pattern_properties(value, schema, root, path):
    if not isinstance(value, dict):
        return []
    problems: list[str] = []
    for key, item in value.items():
        for pattern, sub in schema["patternProperties"].items():
            if re.search(pattern, key):
                problems += _check(item, sub, root, _child(path, key))
    return problems


def _kw_additional_properties(value, schema, root, path):
    if not isinstance(value, dict):
        return []
    known = set(schema.get("properties", {}))
    patterns = list(schema.get("patternProperties", {}))
    extra = [k for k in value if k not in known and not any(re.search(p, k) for p in patterns)]
    rule = schema["additionalProperties"]
    if rule is True:
        return []
    if rule is False:
        allowed = sorted(known) + [f"/{p}/" for p in patterns]
        return [f"{_child(path, k)}: unknown key (allowed: {', '.join(allowed)})" for k in extra]
    problems: list[str] = []
    for key in extra:
        problems += _check(value[key], rule, root, _child(path, key))
    return problems


def _kw_property_names(value, schema, root, path):
    if not isinstance(value, dict):
        return []
    problems: list[str] = []
    for key in value:
        for problem in _check(key, schema["propertyNames"], root, _child(path, key)):
            problems.append(f"{_child(path, key)}: key not allowed here ({problem.split(': ', 1)[-1]})")
    return problems


def _kw_min_properties(value, schema, root, path):
    if isinstance(value, dict) and len(value) < schema["minProperties"]:
        return [f"{_where(path)}: needs at least {schema['minProperties']} entr(y/ies), found {len(value)}"]
    return []


def _kw_items(value, schema, root, path):
    if not isinstance(value, list):
        return []
    problems: list[str] = []
    for index, item in enumerate(value):
        problems += _check(item, schema["items"], root, f"{path}[{index}]")
    return problems


def _kw_min_items(value, schema, root, path):
    if isinstance(value, list) and len(value) < schema["minItems"]:
        return [f"{_where(path)}: needs at least {schema['minItems']} item(s), found {len(value)}"]
    return []


def _kw_minimum(value, schema, root, path):
    if _type_ok(value, "number") and value < schema["minimum"]:
        return [f"{_where(path)}: {value!r} is below the minimum {schema['minimum']}"]
    return []


def _kw_min_length(value, schema, root, path):
    if isinstance(value, str) and len(value) < schema["minLength"]:
        return [f"{_where(path)}: must be at least {schema['minLength']} character(s) long"]
    return []


def _kw_pattern(value, schema, root, path):
    if isinstance(value, str) and not re.search(schema["pattern"], value):
        return [f"{_where(path)}: {value!r} does not match the pattern {schema['pattern']!r}"]
    return []


def _kw_any_of(value, schema, root, path):
    failures = [_check(value, sub, root, path) for sub in schema["anyOf"]]
    if any(not f for f in failures):
        return []
    reasons = "; or ".join(f[0].split(": ", 1)[-1] for f in failures)
    return [f"{_where(path)}: {value!r} matches none of the allowed forms ({reasons})"]


def _kw_all_of(value, schema, root, path):
    problems: list[str] = []
    for sub in schema["allOf"]:
        problems += _check(value, sub, root, path)
    return problems


def _kw_if(value, schema, root, path):
    if _check(value, schema["if"], root, path):
        return []
    return _check(value, schema.get("then", {}), root, path)


def _kw_then(value, schema, root, path):
    return []  # evaluated by "if"


_KEYWORDS = {
    "$ref": _kw_ref,
    "type": _kw_type,
    "enum": _kw_enum,
    "const": _kw_const,
    "required": _kw_required,
    "properties": _kw_properties,
    "patternProperties": _kw_pattern_properties,
    "additionalProperties": _kw_additional_properties,
    "propertyNames": _kw_property_names,
    "minProperties": _kw_min_properties,
    "items": _kw_items,
    "minItems": _kw_min_items,
    "minimum": _kw_minimum,
    "minLength": _kw_min_length,
    "pattern": _kw_pattern,
    "anyOf": _kw_any_of,
    "allOf": _kw_all_of,
    "if": _kw_if,
    "then": _kw_then,
}
_KEYWORD_ORDER = list(_KEYWORDS)
