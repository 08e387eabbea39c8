"""Loading configs: a YAML/TOML file plus dotted command-line overrides (``loss.eps_high=0.28``),
validated into the models of ``stablerl.config``; what a resume may change; ``--help`` text.

Every error is a ``ValueError`` whose message fits on one line and names the key or the file.
"""

from __future__ import annotations

from pydantic import BaseModel

from stablerl.config import RESUMABLE_KEYS, RunConfig


def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"config file {path!r}: line {line} is not valid UTF-8") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path!r} is not valid TOML: {e}") from None
        return data
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at the top level")
        return data
    raise ValueError(f"config file {path!r}: allowed extensions are .yaml, .yml, .toml")


def apply_overrides(data: dict, overrides: list[str], model: type[BaseModel] | None = None) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict.

    Values are parsed as YAML (numbers, booleans, lists), except for keys that ``model`` declares
    as strings: those take the text as written, so ``task.prompt_template=Question: {question}``
    is the string it looks like (YAML would read it as a mapping).
    """
    import copy

    import yaml

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. loss.eps_high=0.28)")
        node = out
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            node = _child(node, part, item, ".".join(parents[: i + 1]))
        if isinstance(node, list):  # a list entry by index: eval.sets.0=...
            _child(node, leaf, item, key)
            leaf = int(leaf)
        if raw == "":
            node[leaf] = ""
        elif model is not None and _is_text_field(model, key.split(".")) and raw.lower() not in ("null", "none", "~"):
            node[leaf] = raw
        else:
            try:
                node[leaf] = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ValueError(
                    f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                    "quote it, e.g. key='text: with colon'"
                ) from None
    return out


def _child(node, part: str, item: str, where: str):
    """``node[part]`` for a section (created when missing) or, for a list and a number, its entry."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ValueError(
                f"override {item!r}: {where.rpartition('.')[0]} has {len(node)} entries (indices 0.."
                f"{len(node) - 1}); {part!r} is not one of them"
            )
        return node[int(part)]
    if not isinstance(node, dict):
        raise ValueError(f"override {item!r}: {where.rpartition('.')[0] or where!r} is not a section")
    if part.isdigit() and not node:
        raise ValueError(
            f"override {item!r}: {where.rpartition('.')[0]} has no entries to index; set the whole "
            "list (in the config file, or as key=[{...}]) first"
        )
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)) and where != item.partition("=")[0]:
        raise ValueError(f"override {item!r}: {part!r} is not a section")
    return child


def _is_text_field(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the dotted key ``path`` of ``model`` is a str (or optional str) field (list entries
    by index: ``eval.sets.0.name``)."""
    import typing

    ann = model
    for part in path:
        if part.isdigit():  # an entry of a list field: its element type
            args = typing.get_args(ann)
            if typing.get_origin(ann) is not list or not args:
                return False
            ann = args[0]
            continue
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return False
        field = ann.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
    if typing.get_origin(ann) is list:  # list[str]: its args are (str,), but the value is a YAML list
        return False
    args = typing.get_args(ann) or (ann,)
    return str in args and not any(a not in (str, type(None)) for a in args)


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def build_config(model: type[BaseModel], path: str | None, overrides: list[str], base: dict | None = None) -> BaseModel:
    """(``base`` or file) + overrides -> validated config; errors name the key and what is allowed."""
    from pydantic import ValidationError

    data = base if base is not None else (load_file(path) if path else {})
    if base is not None and path:
        data = deep_merge(base, load_file(path))
    data = apply_overrides(data, overrides, model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(model, err["loc"][:-1])
                msg = f"unknown key; allowed here: {', '.join(allowed)}"
            value = err.get("input")
            shown = (
                f" (got {value!r})" if isinstance(value, (int, float, str)) and err["type"] != "extra_forbidden" else ""
            )
            problems.append(f"{loc}: {msg}{shown}")
        # one line, however many problems: "invalid config: a.b: ... ; c.d: ..."
        raise ValueError("invalid config: " + "; ".join(problems)) from None


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys set, section by section."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: RunConfig, new: RunConfig) -> dict[str, tuple]:
    """``{key: (old, new)}`` of every changed key; ``ValueError`` naming those that may not change."""
    before, after = flatten(saved.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    changed = {
        k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
    }
    fixed = [k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_KEYS)]
    if fixed:
        lines = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in fixed)
        raise ValueError(
            f"cannot change {lines} when resuming: it would contradict the checkpoint or change the "
            f"maths mid-run. Allowed on resume: {', '.join(RESUMABLE_KEYS)}* (start a new run "
            "for anything else)"
        )
    return changed


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key (dotted), with default and description, for ``--help``."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe(ann, f"{prefix}{name}.")
        else:
            lines.append(f"  {prefix}{name} = {field.default!r}\n      {field.description or ''}")
    return lines
