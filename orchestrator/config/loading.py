"""Loading a sweep: `load_sweep_file` turns YAML into a frozen, validated `SweepConfig`, or raises
`ConfigError` whose message names every bad field by its path (`training.lr: Input should be
greater than 0`). Every overlay layer and axis value is checked with one set of rules (`_check_overlay`)."""

from __future__ import annotations

import fnmatch
import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import tasks
from common.config import BLOCKS, Frozen
from methods import ANALYSES, ARTIFACTS, METHODS
from methods.analysis import parse_analysis
from methods.training import SelectOn, selection_split
from orchestrator.config.paths import _NOT_AXES, Layer, _head, resolve_path
from orchestrator.config.schema import VARIANT, ConfigError, SeedRule, SweepConfig, needed_kinds, per_method_blocks
from tasks.base import format_validation, parse_block


def _with_values(base: SweepConfig, values: dict[str, Any]) -> SweepConfig:
    raw = base.canonical()
    if "model.name" in values and values["model.name"] != base.model.name:
        # Another architecture: its block starts from the fields the sweep file set explicitly (the
        # other defaults belong to the old architecture), each validated by the new one's config.
        raw["model"] = {**base.model.model_dump(mode="json", exclude_unset=True), "name": values["model.name"]}
    for path, value in values.items():
        resolve_path(base, path)
        set_path(raw, path, value)
    return _build(raw)


# Mappings whose keys are config paths: below them the rest of a path is one key (`axes.model.n_layers`).
_KEYED_BY_PATH = (("axes",), ("variants", "*"), ("method_overrides", "*"), ("tuning", "space"))


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set the dotted `path` of a raw sweep mapping (as YAML spells it) to `value`, creating the
    mappings on the way: `training.lr`, `seeds`, `axes.model.n_layers`, `variants.v.model.init`."""
    parts = path.split(".")
    for prefix in _KEYED_BY_PATH:
        if len(parts) > len(prefix) and all(p in ("*", q) for p, q in zip(prefix, parts, strict=False)):
            parts = [*parts[: len(prefix)], ".".join(parts[len(prefix) :])]
            break
    node = raw
    for i, part in enumerate(parts[:-1]):
        node[part] = {} if node.get(part) is None else node[part]
        if not isinstance(node[part], dict):
            where = ".".join(parts[: i + 1])
            raise ValueError(f"{where} is not a mapping, so {path} cannot be set in it; set {where} itself")
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`PATH=VALUE` (`--set training.lr=0.004`, `--set 'seeds=[0, 1]'`): the path and the value as YAML reads it."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip() or " " in path.strip():
        raise ValueError("expected PATH=VALUE, e.g. --set training.lr=0.004 or --set 'seeds=[0, 1]'")
    try:
        return path.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"the value is not valid YAML ({getattr(err, 'problem', None) or err})") from None


def import_plugins(plugins: Any, errors: list[str], search: tuple[Path, ...] = ()) -> None:
    """Import each plug-in module, found in the first folder of `search` that holds it (put on
    sys.path, and on PYTHONPATH for the Ray workers started later), else on the Python path."""
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        errors.append("plugins: expected a list of module names, e.g. [my_lab.methods]")
        return
    for module in plugins:
        top = module.split(".")[0]
        folder = next((str(f) for f in search if (f / top).is_dir() or (f / f"{top}.py").is_file()), None)
        if folder is not None and folder not in sys.path:
            sys.path.insert(0, folder)
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
        try:
            importlib.import_module(module)
        except Exception as err:  # any import failure is the user's to fix; say which and why
            looked = f" (looked in {', '.join(map(str, search))} and the Python path)" if search else ""
            errors.append(f"plugins: cannot import {module!r}: {type(err).__name__}: {err}{looked}")


def plugin_paths(plugins: tuple[str, ...]) -> dict[str, str]:
    """Where each imported plug-in module was found: the folder its top-level package is in."""
    out = {}
    for module in plugins:
        file = getattr(sys.modules.get(module), "__file__", None)
        if file:
            out[module] = str(Path(file).resolve().parents[module.count(".") + (Path(file).name == "__init__.py")])
    return out


def _parse_blocks(data: dict, errors: list[str]) -> None:
    """Replace the task, model, analysis and plug-in block entries of `data` by validated objects, and
    artifact kinds' shorthands by the `axes:` they stand for. A sweep holds every declared block, the
    block of each method it lists and kind they need, and any other such block it writes or sweeps."""
    for key, registry in (("task", tasks.TASKS), ("model", tasks.MODELS)):
        if key not in data:
            errors.append(f"{key}: missing; give a mapping with 'name' (one of: {', '.join(registry.names())})")
            continue
        try:
            data[key] = parse_block(registry, data[key], key)
        except ValueError as err:
            errors.append(str(err))
    _parse_analyses(data, errors)
    methods = data.get("methods") if isinstance(data.get("methods"), (list, tuple)) else []
    methods = [m for m in methods if isinstance(m, str) and m in METHODS]
    needed = needed_kinds(methods, [a["name"] for a in data["analyses"]])
    axes = data.get("axes", {})
    for key, path in [item for _, kind in ARTIFACTS.items() for item in kind.shorthand.items()]:
        if key in data and isinstance(axes, dict):
            if path in axes:
                errors.append(f"{key}: lists the values of the axis {path}, which axes: sets too; keep one")
            data["axes"] = axes = {**axes, path: data.pop(key)}
    swept = {_head(str(path)) for path in axes} if isinstance(axes, dict) else set()
    training: dict[str, dict] = {}
    for name in [n for n in METHODS.names() if n in data]:  # `<method>: {training: {...}}`: an overlay layer
        has_training = isinstance(data[name], dict) and "training" in data[name]
        if has_training:
            data[name] = dict(data[name])
            training[name] = data[name].pop("training")
            if not isinstance(training[name], dict):
                errors.append(f"{name}.training: expected a mapping of training fields, e.g. {{lr: 30, epochs: 200}}")
                training.pop(name)
        if METHODS.get(name).Config is None and (data.pop(name) or not has_training):
            errors.append(f"{name}: method {name!r} has no settings of its own besides `training:`; remove them")
    schemas = {name: (config, True) for name, config in BLOCKS.items()}
    owners = [(n, m, n in methods or n in swept) for n, m in METHODS.items()]
    owners += [(n, k, n in needed or n in swept) for n, k in ARTIFACTS.items()]
    for name, owner, used in owners:
        if owner.Config is None:
            continue
        if name in schemas:
            errors.append(f"{name}: two plug-ins declare a block named {name!r} (a method, artifact kind or "
                          "declared block); rename one")  # fmt: skip
            continue
        schemas[name] = (owner.Config, used)
    settings: dict[str, Frozen] = {}
    for name, (config, used) in schemas.items():
        if used or name in data:
            _parse_settings(data, name, config, settings, errors)
    data["blocks"], data["method_training"] = settings, training


def _parse_analyses(data: dict, errors: list[str]) -> None:
    analyses = data.get("analyses", ())
    if not isinstance(analyses, (list, tuple)):
        valid = ", ".join(ANALYSES.names())
        errors.append(f"analyses: expected a list of analysis names or {{name: ..., <params>}}; valid names: {valid}")
        data["analyses"] = ()
        return
    normalised = []
    for i, entry in enumerate(analyses):
        try:
            name, config = parse_analysis(entry, f"analyses[{i}]")
        except ValueError as err:
            errors.append(str(err))
            continue
        normalised.append({"name": name, **(config.canonical() if config is not None else {})})
    names = [a["name"] for a in normalised]
    if len(set(names)) != len(names):
        errors.append(f"analyses: {names} lists an analysis more than once")
    data["analyses"] = tuple(normalised)


def _parse_settings(data: dict, name: str, config_cls: type, settings: dict, errors: list[str]) -> None:
    """Pop the top-level block `name` (absent: defaults) and validate it into `settings[name]`."""
    block = data.pop(name, {}) or {}
    if not isinstance(block, dict):
        errors.append(f"{name}: expected a mapping of {name}'s settings")
        return
    try:
        settings[name] = config_cls.model_validate(block)
    except ValidationError as err:
        errors.append(format_validation(err, name))


def _build(raw: dict) -> SweepConfig:
    """Validate a raw mapping into a SweepConfig; raises ValueError with one line per problem."""
    errors: list[str] = []
    data = dict(raw)
    data.pop("blocks", None)
    _parse_blocks(data, errors)
    if errors:
        # Still check the other fields, so one pass reports every problem: stand-ins replace the
        # blocks that failed (a bare Frozen() passes the field's type check).
        for key in ("task", "model"):
            if not isinstance(data.get(key), Frozen):
                data[key] = Frozen()
    try:
        config = SweepConfig(**data)
    except ValidationError as err:
        errors.append(format_validation(err))
        raise ValueError("\n".join(errors)) from None
    if errors:
        raise ValueError("\n".join(errors))
    # The axes of the kinds the sweep needs are axes of its grid, with the block's one value by default.
    kinds = needed_kinds(config.methods, [a["name"] for a in config.analyses])
    paths = [p for kind in kinds for p in ARTIFACTS.get(kind).axes if p not in config.axes]
    if not paths:
        return config
    return config.model_copy(update={"axes": {**config.axes, **{p: (resolve_path(config, p),) for p in paths}}})


def _check_runnable(config: SweepConfig) -> list[str]:
    """Problems only building the task and model reveal (data directories, shapes)."""
    errors = []
    try:
        task = config.build_task()
    except ValueError as err:  # e.g. a data directory that is missing or malformed
        return [str(err)]
    try:
        task.build_model(config.model)
    except ValueError as err:
        return [f"model: {err}"]
    if not task.trains_on_zero and any(task.downstream_size(f) < 1 for f in config.data_fractions):
        errors.append(
            f"data_fractions: {list(config.data_fractions)} includes a budget of 0 training samples, "
            f"and task {config.task.name!r} has nothing else to train on; use fractions > 0"
        )
    budgets: dict[int, float] = {}
    for fraction in config.data_fractions:
        n = task.downstream_size(fraction)
        if n in budgets:
            errors.append(
                f"data_fractions: {budgets[n]} and {fraction} both give a budget of n = {n} samples, so they would "
                "be the same point of every curve; drop one"
            )
        budgets.setdefault(n, fraction)
    try:
        config.analysis_list()
    except ValueError as err:
        errors.append(str(err))
    return errors + ([] if errors else _check_selection(config, task))


def _check_selection(config: SweepConfig, task) -> list[str]:
    """`training.select: {split, label}`, however set (the file, a method's block or overrides, a
    variant, an axis value): the task's downstream data has that validation split and label (checked
    on the first seed's data at the first budget, before anything runs). A stage of a method's own
    that selects on a split is checked when it trains (`methods.training.fit_many`)."""
    points = [{}] + [{path: value} for path, values in config.axes.items() for value in values]
    points += [{**point, VARIANT: name} for name in config.variants for point in list(points)]
    chosen: dict[str, tuple[SelectOn, list[str]]] = {}
    for method in config.methods:
        for point in points:
            try:
                select = config.effective(method, point).training.select
            except ValueError:  # a value this method cannot take: reported by the overlay's checks
                continue
            if isinstance(select, SelectOn):
                users = chosen.setdefault(select.describe(), (select, []))[1]
                users += [method] if method not in users else []
    if not chosen:
        return []
    errors, data = [], task.downstream_data(config.first_seeds[0], config.data_fractions[0])
    for select, users in chosen.values():
        try:
            selection_split(select, data)
        except ValueError as err:
            errors.append(f"training.select ({', '.join(users)}): {str(err).removeprefix('training.select: ')}")
    return errors


def _per_method_hint() -> str:
    return f"only {', '.join(sorted(b + '.*' for b in per_method_blocks()))} can differ between methods"


def _check_overlay(config: SweepConfig) -> list[str]:
    """Every layer (and each axis value, as a layer of its own): its paths settable in its scope,
    its values valid (a variant's also with each axis value) and runnable where they change the
    task or model. Errors name the layer as the sweep file spells it."""
    axes = [Layer("axes", {path: value}) for path, values in config.axes.items() for value in values]
    errors = _check_shared(config)
    for layer in [*config.layers(), *axes]:
        bad = [f"{layer.where}.{p}: {why}" for p in layer.values if (why := _path_problem(config, layer, p))]
        errors += bad
        for context in [] if bad else [{}] + ([a.values for a in axes] if layer.variant else []):
            problem = _value_problem(config, layer, context)
            if problem:
                errors.append(problem)
                break
    return list(dict.fromkeys(errors))  # an axis's bad path once, not once per value


def _path_problem(config: SweepConfig, layer: Layer, path: str) -> str | None:
    """Why `layer` cannot set `path`, or None."""
    head, axis = _head(path), layer.where == "axes"
    if path == "task.name":
        reason = "a sweep has one task; run one sweep per task and report them together"
        return f"{path} cannot be an axis: {reason}" if axis else reason
    if axis and head in _NOT_AXES:
        return f"{path} cannot be an axis: {_NOT_AXES[head]}"
    try:
        resolve_path(config, path)
    except ValueError as err:
        return str(err)
    if layer.owner is None:
        if head in METHODS and head not in config.methods:
            return f"method {head!r} is not in methods {list(config.methods)}"
        return f"{path} is also an axis; drop one of them" if layer.variant and path in config.axes else None
    if layer.owner not in config.methods:
        return f"method {layer.owner!r} is not in methods {list(config.methods)}"
    if head in METHODS and head != layer.owner:
        return f"{path} is another method's setting"
    if head not in per_method_blocks():
        return f"cannot set {path}; {_per_method_hint()}"
    if path in config.axes:
        return f"{path} is also an axis; drop one of them"
    if any(path in values for values in config.variants.values()):
        return f"{path} is also set by a variant; drop one of them"
    return None


def _value_problem(config: SweepConfig, layer: Layer, context: dict[str, Any]) -> str | None:
    """Why `layer`'s values (with the axis value `context`) are invalid or cannot run, or None."""
    where = layer.where + "".join(f" with axes.{p}={v!r}" for p, v in context.items())
    if layer.where == "axes":
        ((path, value),) = layer.values.items()
        where = f"axes.{path}={value!r}"
    try:
        variant = config.with_values({**layer.values, **context})
    except ValueError as err:
        lines = str(err).splitlines()
        if layer.where != "axes":
            return f"{where}: " + "; ".join(lines)
        # One setting's rule ("must be >= 0"); several settings (another model's block): each named.
        rule = lines[0].split(": ", 1)[-1] if len(lines) == 1 and lines[0].startswith(path) else "; ".join(lines)
        return f"axes.{path}: value {value!r} is invalid: {rule}"
    if any(_head(p) in ("task", "model") for p in [*layer.values, *context]):
        return "\n".join(f"{where}: {e}" for e in _check_runnable(variant)) or None
    return None


def _check_shared(config: SweepConfig) -> list[str]:
    """A shared artifact's setting reaches every method that uses the artifact: one value only."""
    errors, seen = [], {}
    for layer in config.layers():
        for path, value in layer.values.items() if layer.owner and not layer.method else ():
            if seen.setdefault(path, (layer.owner, value))[1] != value:
                errors.append(f"method_overrides: {path} is a shared artifact setting, set differently for "
                              f"{seen[path][0]!r} and {layer.owner!r}; give one value")  # fmt: skip
    return errors


def _check_metric(config: SweepConfig, metric: str, where: str = "seeds.until.metric") -> list[str]:
    """`seeds.until.metric`: a column the report summarises (accuracies, what the artifact kinds the
    sweep needs report, the summarised columns of its analyses)."""
    kinds = needed_kinds(config.methods, [a["name"] for a in config.analyses])
    known = ["test_acc", "val_acc", *(c for k in kinds for c in ARTIFACTS.get(k).reported)]
    for name, _ in config.analysis_list():
        known += [pattern for pattern, column in ANALYSES.get(name).columns.items() if column.summarise]
    if any(fnmatch.fnmatchcase(metric, pattern) for pattern in known):
        return []
    return [f"{where}: {metric!r} is not a column the report summarises; one of: {', '.join(known)}"]


def _check_space(config: SweepConfig) -> list[str]:
    """`tuning.space`: numeric settings that may differ between methods."""
    errors = []
    for path in config.tuning_space:
        if _head(path) not in per_method_blocks():
            errors.append(f"tuning.space: cannot tune {path!r}; {_per_method_hint()}")
            continue
        try:
            value = resolve_path(config, path)
        except ValueError as err:
            errors.append(f"tuning.space.{path}: {err}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"tuning.space: {path} is not a numeric setting, so it cannot be searched")
    return errors


def load_sweep(raw: Any, source: str = "sweep", search: tuple[Path, ...] = ()) -> SweepConfig:
    """Validate a parsed sweep mapping, its `plugins:` found in the folders `search` first. Raises
    ConfigError listing every problem by field path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    errors: list[str] = []
    import_plugins(raw.get("plugins", ()), errors, search)
    config = None
    try:
        config = _build(raw)
    except ValueError as err:
        errors.append(str(err))
    if config is not None:
        errors += _check_overlay(config) + _check_space(config)
        errors += [f"report.versus: {m!r} is not one of methods {list(config.methods)}; add it or drop it"
                   for m in config.report.versus if "=" not in m and m not in config.methods]  # fmt: skip
        for metric in config.report.metrics:
            errors += _check_metric(config, metric, "report.metrics")
        rule = config.seeds if isinstance(config.seeds, SeedRule) else None
        if rule and rule.until.versus is not None:
            errors += _check_seeds_versus(config, rule.until.versus)
        if not errors:
            errors += _check_runnable(config)
        if not errors and rule:
            errors += _check_metric(config, rule.until.metric)
    if not errors:
        return config
    raise ConfigError(f"{source}: invalid sweep file\n  " + "\n  ".join("\n".join(errors).splitlines()))


def _check_seeds_versus(config: SweepConfig, versus: str) -> list[str]:
    """`seeds.until.versus`: a method of the sweep, or `PATH=VALUE` with PATH an axis (or set by the
    variants) and VALUE one of its values, compared as the report pairs them (the partner whose cells
    get the seeds of the pairs must be in the grid)."""
    from orchestrator.report.series import same_value

    if "=" not in versus:
        return [] if versus in config.methods else [
            f"seeds.until.versus: {versus!r} is not one of methods {list(config.methods)}; "
            "give a method or PATH=VALUE with PATH an axis, e.g. model.name=resnet18"]  # fmt: skip
    path, _, text = versus.partition("=")
    path = path.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"seeds.until.versus: {versus!r}: VALUE is not YAML ({err}); e.g. versus: model.name=resnet18"]
    values = [*config.axes.get(path, ()), *(v[path] for v in config.variants.values() if path in v)]
    if not values:
        return [f"seeds.until.versus: {path!r} is not an axis of this sweep (axes: {list(config.axes)}) nor set "
                "by its variants; give a method or PATH=VALUE with PATH an axis"]  # fmt: skip
    if not any(same_value(v, value) for v in values):
        return [f"seeds.until.versus: {value!r} is not a value of {path} ({values}); write VALUE as the axis "
                f"lists it, e.g. {path}={values[0]}"]  # fmt: skip
    return []


def load_sweep_file(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read and validate a YAML sweep file, with `overrides` (`PATH=VALUE`, `--set`) applied to it
    first; its plug-ins are found in its folder, then the working folder, then the Python path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file; pass the path of a YAML file such as configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    for text in overrides if isinstance(raw, dict) else ():  # not a mapping: load_sweep says so
        try:
            set_path(raw, *parse_override(text))
        except ValueError as err:
            raise ConfigError(f"{path}: --set {text!r}: {err}") from None
    source = f"{path} (with {' '.join(f'--set {shlex.quote(t)}' for t in overrides)})" if overrides else str(path)
    return load_sweep(raw, source, (path.resolve().parent, Path.cwd()))
