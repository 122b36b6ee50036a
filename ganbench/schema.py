"""JSON Schemas of study and comparison files, from the same pydantic models that read them.

``json_schema("study")`` / ``json_schema("compare")`` is what ``ganbench schema`` prints and
``schemas/*.schema.json`` holds: editors that speak the YAML language server check and
complete a study file as it is typed (the shipped ``studies/*.yaml`` name theirs on their
first line). Beyond the models' structure, the names the registries know (targets, metrics,
samplers, pruners, losses, activations, optimizers, tricks) are listed as enums, and every
field carries the description written beside it in the code. ``field_table(kind)`` renders
the same fields as the Markdown reference of the docs.
"""

from __future__ import annotations

import inspect
import io
import tokenize
from typing import Any

from ganbench.config import OPTIMIZERS, TrainConfig
from ganbench.spec import (
    PRUNERS,
    SAMPLERS,
    ArmSection,
    Budget,
    CompareSpec,
    Correction,
    Distribution,
    ExecutionSpec,
    HeartbeatSpec,
    Objective,
    PrunerSpec,
    SamplerSpec,
    StudySpec,
    TargetSpec,
    TrackingSpec,
)

KINDS = ("study", "compare")
SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"


def comments(cls: type) -> dict[str, str]:
    """What the code says of each field of ``cls``: the comment after it (continued on the
    comment lines aligned below it), after any comment lines just above it."""
    source = inspect.getsource(cls)
    out: dict[str, str] = {}
    above: list[str] = []           # comment lines above the next field
    field, last = None, -1           # the field whose comment may continue, and its line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.line.strip().startswith(
                f"{tok.string}:"):
            field, last = tok.string, tok.start[0]
            if above:
                out[field] = " ".join(above)
                above = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            alone = tok.line.strip().startswith("#")
            if not alone and field is not None and tok.start[0] == last:
                out[field] = f"{out[field]} {text}" if field in out else text
            elif alone and tok.start[1] > 4 and field is not None and tok.start[0] == last + 1:
                out[field] = f"{out.get(field, '')} {text}".strip()
                last += 1
            elif alone and tok.start[1] == 4:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            above = []              # a method or other statement: not a field's comment
    return out


def _described(schema: dict[str, Any], props: dict[str, str]) -> None:
    for name, text in props.items():
        if name in schema.get("properties", {}):
            schema["properties"][name].setdefault("description", text)


def _enum(prop: dict[str, Any], names: Any) -> None:
    """Restrict a string property (or the string branch of an optional one) to ``names``."""
    names = sorted(names)
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch["enum"] = names


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a study (``kind`` "study") or comparison file."""
    from ganbench.losses import LOSSES
    from ganbench.metrics import METRICS
    from ganbench.models import ACTIVATIONS
    from ganbench.targets import TARGETS
    from ganbench.tricks import TRICKS

    model = StudySpec if kind == "study" else CompareSpec
    schema = model.model_json_schema()
    defs = schema["$defs"]
    trainer = comments(TrainConfig)
    for section in ("TrainSection", "ModelSection", "ArmSection"):
        if section in defs:
            _described(defs[section], trainer)
            props = defs[section]["properties"]
            for key, names in (("loss", LOSSES), ("activation", ACTIVATIONS),
                               ("optimizer", OPTIMIZERS)):
                if key in props:
                    _enum(props[key], names)
            if "tricks" in props:
                props["tricks"]["propertyNames"] = {"enum": sorted(TRICKS)}
    for cls in (Distribution, Objective, TargetSpec, SamplerSpec, PrunerSpec, TrackingSpec,
                ExecutionSpec, HeartbeatSpec, Budget, Correction, ArmSection):
        if cls.__name__ in defs:
            said = comments(cls)
            if "source" in said:  # the field's name in a file is its alias
                said["from"] = said.pop("source")
            _described(defs[cls.__name__], said)
            defs[cls.__name__].setdefault("description", inspect.cleandoc(cls.__doc__ or ""))
    _described(schema, comments(model))
    _enum(defs["TargetSpec"]["properties"]["name"], TARGETS)
    _enum(defs["Objective"]["properties"]["metric"], METRICS)
    _enum(defs["SamplerSpec"]["properties"]["name"], SAMPLERS)
    _enum(defs["PrunerSpec"]["properties"]["name"], PRUNERS)
    if kind == "compare":  # `budget: 6` is `budget: {trials: 6}`
        budget = schema["properties"]["budget"]
        schema["properties"]["budget"] = {
            "anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"$ref": "#/$defs/Budget"}],
            "description": budget.get("description", "tuning trials per arm, or compute")}
    schema["$schema"] = SCHEMA_URL
    schema["title"] = f"ganbench {kind} file"
    schema["description"] = inspect.cleandoc(model.__doc__ or "")
    return schema


def field_table(kind: str) -> str:
    """Every field of a ``kind`` file as Markdown: one table per section (the file's top
    level, then each nested model), with type, default and description."""
    schema = json_schema(kind)
    out = [_table("top level", schema)]
    for name, sub in sorted(schema["$defs"].items()):
        if sub.get("properties"):
            out.append(_table(name, sub))
    return "\n\n".join(out) + "\n"


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and isinstance(
            prop["additionalProperties"], dict):
        return f"mapping to {_type(prop['additionalProperties'])}"
    return str(kind)


def _table(title: str, schema: dict[str, Any]) -> str:
    lines = [f"### {title}", ""]
    if schema.get("description") and title != "top level":
        lines += [" ".join(schema["description"].split()), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        default = "required" if name in required else \
            ("" if "default" not in prop else f"`{prop['default']}`")
        text = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type(prop)} | {default} | {text} |")
    return "\n".join(lines)
