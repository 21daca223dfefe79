"""Series: which finished rows the report's statistics are taken over, and what each is called.

A series is one effective trial config minus its seed and data fraction: the rows' `series` column,
a stable hash of `config_json` without them (computed here for older result files). Statistics are
taken per series, never across series; two rows for one (series, seed, budget) are an error, not
averaged. A series' `label` is its method, `@` the values of the axes its artifacts declare (its
`coordinates`), plus the config fields that tell it apart from the series of its task that share
that label (`<method> @0.75 [model.n_layers=4]`); `family` is the label without the coordinates.
Every table carries `series`, `task`, `method`, `label`, `family` and one column per sweep axis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from common.config import stable_hash
from methods import ARTIFACTS, METHODS
from orchestrator import results
from orchestrator.config import ConfigError

# Per-trial fields that vary inside a series; a series is everything else of the config.
PER_TRIAL = ("seed", "data_fraction")
# Keys of the old whole-sweep `config_json` that describe the grid or the machinery, not a trial.
_SWEEP_ONLY = (
    "name", "plugins", "resources", "storage", "max_failures", "tuning", "method_overrides",
    "methods", "data_fractions", "seeds",
)  # fmt: skip
_MAX_LABEL_FIELDS = 3


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf}; lists are leaves."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) and value else {path: value})
    return out


def coordinates(columns) -> list[str]:
    """The axis columns of paths that artifact kinds declare as axes (`ArtifactKind.axes`): a
    series' label shows their values after its method, and the curves have one panel per value."""
    declared = {path for _, kind in ARTIFACTS.items() for path in kind.axes}
    return [c for c in results.axis_columns(columns) if c in declared]


def series_config(row: dict[str, Any]) -> dict[str, Any]:
    """A row's effective config without its seed and data fraction: what its series is a hash of.
    Older rows carried the whole sweep's config (no top-level `method`): its grid keys are dropped
    and the row's own method and axis values put in (trials that then collide are refused by `prepare`).
    """
    text = row.get("config_json")
    config = json.loads(text) if isinstance(text, str) and text else {}
    if "method" not in config:
        config = {k: v for k, v in config.items() if k not in _SWEEP_ONLY}
        config["method"] = row["method"]
        config.update({c: row[c] for c in results.axis_columns(row) if not pd.isna(row[c])})
        config.setdefault("task", {"name": row.get("task")})
        config.setdefault("model", {"name": row.get("model")})
    return {k: v for k, v in config.items() if k not in PER_TRIAL}


def prepare(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished rows with a `series` column, and one row per series (indexed by series) with its
    task, method, axis values, `label`, `family` and flattened config without method and
    coordinates (`flat`). Raises ConfigError when two finished rows are the same trial.
    """
    done = table[table["status"] == "done"].copy()
    configs = [series_config(r) for r in done.to_dict("records")]
    given = done["series"] if "series" in done else pd.Series([None] * len(done), index=done.index)
    done["series"] = [s if isinstance(s, str) and s else stable_hash(c) for s, c in zip(given, configs, strict=True)]
    info = _series_info(done, configs)
    _check_duplicates(done, info)
    return done, info


def _series_info(done: pd.DataFrame, configs: list[dict]) -> pd.DataFrame:
    axes, coords = results.axis_columns(done.columns), coordinates(done.columns)
    rows = {}
    for (_, row), config in zip(done.iterrows(), configs, strict=True):
        if row["series"] not in rows:
            flat = {k: v for k, v in flatten(config).items() if k != "method" and k not in coords}
            rows[row["series"]] = {**row[["series", "task", "method", *axes]].to_dict(), "flat": flat, "own": set()}
        own = row.get("own_settings")
        rows[row["series"]]["own"] |= set(own.split(",")) if isinstance(own, str) and own else set()
    info = pd.DataFrame(list(rows.values()), columns=["series", "task", "method", *axes, "flat", "own"])
    base = [_label(row["method"], row[coords]) for _, row in info.iterrows()]
    # Named axes (`variant`: not a config path) label a series by name where the name alone tells it apart.
    named = [
        " ".join(f"{a}={row[a]}" for a in axes if "." not in a and not pd.isna(row[a])) for _, row in info.iterrows()
    ]
    info["label"] = _labels(info["task"], base, info["flat"], info["series"], axes, named)
    # The family is the series without its coordinates: one line of a figure drawn against them.
    info["family"] = _labels(info["task"], info["method"], info["flat"], info["series"], axes, named)
    return info.set_index("series", drop=False)


def _label(method: str, values) -> str:
    """`method @v` (`@v1,v2` for several coordinates): the values the series has, no `@` for none."""
    shown = [_fmt_value(v) for v in values if not pd.isna(v)]
    return f"{method} @{','.join(shown)}" if shown else method


def _labels(tasks, bases, flats, series, axes: list[str], named: list[str] | None = None) -> list[str]:
    """Each base label, plus what tells apart the distinct configs of one task sharing it: their
    `named` tags (e.g. `variant=torch_init`) where those alone do, else the fields that differ."""
    tasks, bases, flats, series = list(tasks), list(bases), list(flats), list(series)
    labels = list(bases)
    groups: dict[tuple, dict[str, list[int]]] = {}
    for i, (task, base, flat) in enumerate(zip(tasks, bases, flats, strict=True)):
        groups.setdefault((task, base), {}).setdefault(_exact(flat), []).append(i)
    for configs in groups.values():
        if len(configs) < 2:
            continue
        members = list(configs.values())
        tags = [{named[i] for i in m} for m in members] if named is not None else []
        if tags and all(len(t) == 1 and "" not in t for t in tags) and len(set().union(*tags)) == len(members):
            suffixes = [f" [{named[m[0]]}]" for m in members]
        else:
            suffixes = [_bracket(d) for d in differing_fields([flats[m[0]] for m in members], first=axes)]
        for same, suffix in zip(members, suffixes, strict=True):
            for i in same:
                labels[i] = bases[i] + suffix
    # Two series whose configs differ only in ways flattening cannot see still get distinct labels.
    count: dict[tuple, set] = {}
    for task, label, flat in zip(tasks, labels, flats, strict=True):
        count.setdefault((task, label), set()).add(_exact(flat))
    return [
        label if len(count[(t, label)]) == 1 else f"{label} #{s[:6]}"
        for t, label, s in zip(tasks, labels, series, strict=True)
    ]


def differing_fields(flats: list[dict[str, Any]], first: Sequence[str] = ()) -> list[list[str]]:
    """For each flattened config, `path=value` of the paths whose values are not the same in all;
    paths in `first` lead, the rest follow in name order."""
    paths = sorted(set().union(*flats))
    differ = [p for p in paths if len({_exact(f.get(p, "-")) for f in flats}) > 1]
    # A field only some configs have, in a block whose `name` differs (model.cam_suppression when
    # model.name differs), follows from that name: the name tells the series apart.
    names = {p.rsplit(".", 1)[0] for p in differ if p.endswith(".name")}
    differ = [p for p in differ if not (p.rsplit(".", 1)[0] in names and any(p not in f for f in flats))]
    differ.sort(key=lambda p: (p not in first, p))
    return [[f"{p}={_fmt_value(f.get(p, '-'))}" for p in differ] for f in flats]


def _bracket(fields: list[str]) -> str:
    if not fields:
        return ""
    shown = fields[:_MAX_LABEL_FIELDS]
    more = len(fields) - len(shown)
    return " [" + ", ".join(shown) + (f", +{more}" if more else "") + "]"


def _exact(value: Any) -> str:
    """A value as text for comparing: exact, unlike `_fmt_value`'s short floats."""
    return json.dumps(value, sort_keys=True, default=str)


def same_value(a: Any, b: Any) -> bool:
    """Whether a config value equals a `--versus PATH=VALUE`'s VALUE: numbers by value (`8` and `8.0`,
    as a schema may store an int as a float), anything else exactly (`true` is not `1`)."""
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)]
    return float(a) == float(b) if all(numbers) else _exact(a) == _exact(b)


def _fmt_value(value: Any) -> str:
    """A value as text for a label."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _check_duplicates(done: pd.DataFrame, info: pd.DataFrame) -> None:
    dup = done[done.duplicated(["series", "seed", "n_train"], keep=False)]
    if dup.empty:
        return
    series, seed, n_train = dup.iloc[0][["series", "seed", "n_train"]]
    same = dup[(dup["series"] == series) & (dup["seed"] == seed) & (dup["n_train"] == n_train)]
    fractions = sorted(set(pd.to_numeric(same["data_fraction"], errors="coerce")))
    cause = (
        f"data fractions {fractions} give the same budget; keep one of them in the sweep"
        if len(fractions) > 1
        else "two result directories ran the same trial; report one of them"
    )
    raise ConfigError(
        f"{info.loc[series, 'label']} (task {info.loc[series, 'task']}): {len(same)} finished rows for seed "
        f"{seed}, n_train {n_train} ({len(dup)} duplicate rows in all); {cause}"
    )


def reference_for(series: str, info: pd.DataFrame, methods: set[str] | None = None) -> str | None:
    """The reference series to compare `series` with: same task, a method of `methods` (default: the
    no-transfer references, `reference=True`), and of those the one at the least `distance`; of those
    equally near, one whose method set the same paths for itself (`own_settings`: a tuned series
    pairs with a tuned partner, not one of an untuned run merged beside it)."""
    task = info.loc[series, "task"]
    methods = {name for name, method in METHODS.items() if method.reference} if methods is None else methods
    candidates = info[info["method"].isin(methods) & (info["task"] == task)]
    if candidates.empty:
        return None
    near = {
        c.series: (distance(info, series, c.series), _unshared(info, series, c.series)) for c in candidates.itertuples()
    }
    ranked = sorted(candidates.itertuples(), key=lambda c: (*near[c.series], c.label))
    return ranked[0].series


def versus_setting(versus: str) -> tuple[str, Any] | None:
    """`PATH=VALUE` (the value read as YAML) -> (PATH, VALUE); a method name -> None."""
    if "=" not in versus:
        return None
    import yaml

    path, _, text = versus.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--versus {versus}: VALUE is not YAML ({err}); e.g. --versus model.name=gpt") from err
    return path.strip(), value


def partner(series: str, info: pd.DataFrame, versus: str) -> str | None:
    """The series `series` is compared with, or None: a series is never paired with a partner of other
    settings. `versus` a method: the series of that method with the same settings as `series` wherever
    both have them (`distance` 0). `versus` `PATH=VALUE`: the series of the same task and method whose
    config has VALUE at PATH (or, for a PATH of a block such as `model.name`, at PATH) and the same
    settings as `series` elsewhere, fields of one side only aside (a model's own fields); None for a
    series that has VALUE there itself."""
    setting = versus_setting(versus)
    if setting is None:
        ref = reference_for(series, info, {versus})
        return ref if ref is not None and distance(info, series, ref) == 0 else None
    path, value = setting
    own = info.loc[series, "flat"]
    if path not in own or same_value(own[path], value):
        return None
    same = info[(info["task"] == info.loc[series, "task"]) & (info["method"] == info.loc[series, "method"])]
    found = [
        ref
        for ref in same.index
        if path in (theirs := info.loc[ref, "flat"])
        and same_value(theirs[path], value)
        and distance(info, series, ref, ignore=path) == 0
    ]
    return min(found, key=lambda ref: _unshared(info, series, ref), default=None)


def has_versus(info: pd.DataFrame, versus: str) -> bool:
    """Whether any series is a partner of `versus`: of that method, or with VALUE at PATH."""
    setting = versus_setting(versus)
    if setting is None:
        return versus in set(info["method"])
    path, value = setting
    return any(path in flat and same_value(flat[path], value) for flat in info["flat"])


def distance(info: pd.DataFrame, a: str, b: str, ignore: str | None = None) -> int:
    """How many settings two series differ in: fields both configs have (a field set to None, as older
    rows give a setting their method does not use, counts as absent; `ignore`: a field left out; a
    field either series' method set for itself, its `own_settings` such as a tuned learning rate,
    is part of the method, not a setting), and coordinates both have."""
    fa, fb = info.loc[a, "flat"], info.loc[b, "flat"]
    own = _own(info, a) | _own(info, b) | ({ignore} if ignore else set())
    both = [p for p in set(fa) & set(fb) if fa[p] is not None and fb[p] is not None and p not in own]
    differ = sum(_exact(fa[p]) != _exact(fb[p]) for p in both)
    pairs = [(info.loc[a, c], info.loc[b, c]) for c in coordinates(info.columns)]
    return differ + sum(not pd.isna(x) and not pd.isna(y) and x != y for x, y in pairs)


def axis_groups(table: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[list[str], str, Any]]]:
    """(finished rows, series info with `axis` filled in, groups): each group is the series that
    differ only in `axis` (two or more), with its label (`... [mean over AXIS = v1, v2]`) and its
    first member's info. Raises ConfigError when `axis` is not a config path the results vary along."""
    done, info = prepare(table)
    paths = [a for a in results.axis_columns(done.columns) if "." in a]
    if axis not in paths:
        raise ConfigError(
            f"--mean-over {axis}: not a config path these results vary along; their axes: {', '.join(paths) or 'none'}"
        )
    # The value from each series' config where a merged older file lacks the column.
    values = [v if not pd.isna(v) else f.get(axis) for v, f in zip(info[axis], info["flat"], strict=True)]
    info = info.assign(**{axis: values})
    info = info[info[axis].notna()]
    rest = {series: {k: v for k, v in flat.items() if k != axis} for series, flat in info["flat"].items()}
    coords = [c for c in coordinates(info.columns) if c != axis]
    groups: dict[tuple, list[str]] = {}
    for series, row in info.iterrows():
        key = (row["task"], row["method"], _exact(row[coords].tolist()), _exact(rest[series]))
        groups.setdefault(key, []).append(series)
    firsts = [info.loc[members[0]] for members in groups.values()]
    labels = _labels([f["task"] for f in firsts], [_label(f["method"], f[coords]) for f in firsts],
                     [rest[f["series"]] for f in firsts], [f["series"] for f in firsts],
                     [a for a in results.axis_columns(done.columns) if a != axis])  # fmt: skip
    kept = []
    for members, label, first in zip(groups.values(), labels, firsts, strict=True):
        if len(members) >= 2:  # a group of one has nothing to average: the axis does not vary inside it
            values = ", ".join(_fmt_value(v) for v in sorted(info.loc[members, axis].tolist()))
            kept.append((members, f"{label} [mean over {axis} = {values}]", first))
    return done, info, kept


def _own(info: pd.DataFrame, series: str) -> set[str]:
    """The paths the series' method set for itself (`own_settings`; empty for older tables' rows)."""
    return info.loc[series, "own"]


def _unshared(info: pd.DataFrame, a: str, b: str) -> int:
    """How many paths one of two series' methods set for itself and the other's did not."""
    return len(_own(info, a) ^ _own(info, b))
