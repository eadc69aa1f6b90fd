"""Finding, loading and building optimizer plugins.

Sources of plugins, by name:

* classes decorated with :func:`register_optimizer` in this process;
* installed distributions declaring an entry point in the group
  :data:`ENTRY_POINT_GROUP` (``name = package.module:ClassName``);
* an explicit import path ``"package.module:ClassName"`` given by the user.

:func:`available` lists the first two *without importing anything*;
:func:`load` imports one plugin on demand and validates it, so a broken plugin
is reported by name, entry point and distribution and never affects the others.
:func:`build` binds options (``--opt KEY=VALUE`` strings or typed values) to a
plugin's keyword ``__init__`` parameters, coercing by annotation.

A plugin's options are its ``__init__`` parameters after ``self``, keyword or
positional-or-keyword (never ``*args`` or positional-only), each with a default;
``seed`` is set by the trainer and is not an option. ``**kwargs`` is followed
into the base class's ``__init__`` (the ``super().__init__(**kwargs)`` pattern),
stopping at :class:`ZOOptimizer`, whose own ``**defaults`` is not an option.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, Union

from zoedge.errors import PluginError
from zoedge.optim.base import ZOOptimizer

ENTRY_POINT_GROUP = "zoedge.optimizers"
RESERVED = ("seed",)  # set by the trainer, never a user option

_REGISTRY: dict[str, type[ZOOptimizer]] = {}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TRUE, _FALSE = ("true", "1", "yes", "on", "y"), ("false", "0", "no", "off", "n")
_C = TypeVar("_C", bound=type)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from (known without importing it).

    Attributes:
        name: the registry name.
        value: ``"module:attr"`` of the class.
        origin: ``"entry point"``, ``"registered"`` (decorator, this process) or ``"import path"``.
        distribution: installing distribution's name (``None`` unless ``origin == "entry point"``).
        version: that distribution's version.
        description: one line; empty for entry points that were not imported yet.
        conflicts: other sources claiming the same name (see :func:`load`).
    """

    name: str
    value: str
    origin: str
    distribution: str | None = None
    version: str | None = None
    description: str = ""
    conflicts: tuple[PluginInfo, ...] = ()

    @property
    def source(self) -> str:
        """Human-readable origin: ``dist==version``, or where the class was registered / given."""
        if self.origin == "entry point":
            return f"{self.distribution}=={self.version}"
        if self.origin == "registered":
            return f"(registered by {self.value.split(':')[0]})"
        return "(import path)"

    def describe(self) -> str:
        """``plugin 'x' (entry point 'm:C' from distribution d==v)`` for error messages."""
        if self.origin == "entry point":
            where = f"entry point '{self.value}' from distribution {self.source}"
        elif self.origin == "registered":
            where = f"class {self.value} registered in this process"
        else:
            where = "import path given by the user, not an installed distribution"
        return f"optimizer plugin '{self.name}' ({where})"


@dataclass(frozen=True)
class Option:
    """One plugin option (a keyword ``__init__`` parameter).

    Attributes:
        name: parameter name (``--opt NAME=VALUE``).
        annotation: resolved type (``None`` if unannotated and the default is ``None``).
        default: default value.
        help: the parameter's line in the class or ``__init__`` docstring's Args section ("" if none).
    """

    name: str
    annotation: Any
    default: Any
    help: str = ""

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)


# ------------------------------------------------------------------ registration
def register_optimizer(name: str | None = None, description: str | None = None) -> Callable[[_C], _C]:
    """Class decorator: validate a :class:`ZOOptimizer` subclass and register it under ``name``.

    Args:
        name: registry name (default: the class's own ``name`` attribute, else its lower-cased class name).
        description: one line (default: the class's own ``description``, else its docstring's first line).

    Raises:
        PluginError: not a ZOOptimizer subclass, a required hook not overridden, a bad ``__init__``
            signature (``*args``, positional-only, an option without default, no ``seed``), or the
            name is taken by another class.
    """

    def decorate(cls: _C) -> _C:
        label = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s}"
        _validate(cls, label)
        reg_name = name or cls.__dict__.get("name") or cls.__name__.lower()
        if not _NAME_RE.match(reg_name):
            raise PluginError(label, f"registry name {reg_name!r} is not valid",
                              "use letters, digits, '_', '-' or '.', starting with a letter or digit")
        old = _REGISTRY.get(reg_name)
        if old is not None and _qualified(old) != _qualified(cls):  # same module+qualname: a reload
            raise PluginError(f"optimizer plugin '{reg_name}'",
                              f"{label} and {_qualified(old, '.')} both register this name",
                              f"pass another name: @register_optimizer(\"...\") on one of them")
        cls.name = reg_name
        cls.description = description or cls.__dict__.get("description") or _first_line(cls.__doc__)
        _REGISTRY[reg_name] = cls
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove a plugin registered in this process (tests, interactive use); no-op if absent."""
    _REGISTRY.pop(name, None)


# ------------------------------------------------------------------ discovery
def available() -> dict[str, PluginInfo]:
    """All plugins by name: registered in this process and declared by installed entry points.

    Nothing is imported. A name claimed by several sources keeps the first as the
    entry and the others in :attr:`PluginInfo.conflicts`; :func:`load` decides.
    """
    found: dict[str, list[PluginInfo]] = {}
    for name, cls in _REGISTRY.items():
        found[name] = [PluginInfo(name, _qualified(cls), "registered", description=cls.description)]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dname = (dist.metadata["Name"] or getattr(dist, "name", None)) if dist is not None else None
        info = PluginInfo(ep.name, ep.value.strip(), "entry point", dname or "?", dist.version if dist else "?")
        infos = found.setdefault(ep.name, [])
        same = [i for i in infos if i.origin == "registered" and i.value == info.value]
        if same:  # the entry point's module registered its own class: one plugin
            infos[infos.index(same[0])] = replace(info, description=same[0].description)
        else:
            infos.append(info)
    out = {}
    for name in sorted(found):
        infos = sorted(found[name], key=lambda i: i.origin != "entry point")  # entry points carry a distribution
        out[name] = replace(infos[0], conflicts=tuple(infos[1:]))
    return out


def lookup(name: str) -> PluginInfo:
    """The :class:`PluginInfo` of ``name`` (a registry name or ``"module:Class"``), without importing.

    Raises:
        PluginError: unknown name (lists the available ones and close matches).
    """
    if ":" in name:
        if not _PATH_RE.match(name):
            raise PluginError(f"optimizer '{name}'", "is not a valid import path",
                              "write it as package.module:ClassName")
        return PluginInfo(name, name, "import path")
    plugins = available()
    if name in plugins:
        return plugins[name]
    names = sorted(plugins)
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise PluginError(f"optimizer '{name}'",
                      f"no such plugin; available: {', '.join(names) if names else '(none installed)'}",
                      f"{hint}use one of the available names, install a distribution declaring a "
                      f"'{ENTRY_POINT_GROUP}' entry point, or give an import path package.module:ClassName")


def load(name: str) -> type[ZOOptimizer]:
    """Import and validate plugin ``name`` (a registry name or an explicit ``"module:Class"`` path).

    A loaded class without its own ``name`` gets the name it was loaded by.

    Raises:
        PluginError: unknown name; the name is claimed by two distributions (or by an entry point and a
            different registered class); the import fails (original exception text included); the
            object is not a valid ZOOptimizer subclass. The error names the plugin, its entry point
            and distribution (``name==version``).
    """
    info = lookup(name)
    eps = [i for i in (info, *info.conflicts) if i.origin == "entry point"]
    if len(eps) > 1:
        raise PluginError(f"optimizer plugin '{name}'",
                          "is declared by several installed distributions: "
                          + "; ".join(f"{i.source} ('{i.value}')" for i in eps),
                          "uninstall all but one of them (pip uninstall ...)")
    if info.origin == "registered" and not eps:
        return _REGISTRY[name]
    obj = _import(info)
    regs = [i for i in (info, *info.conflicts) if i.origin == "registered"]
    if regs and _REGISTRY.get(name) is not obj:
        raise PluginError(f"optimizer plugin '{name}'",
                          f"{info.describe()} and class {regs[0].value} registered in this process "
                          f"both claim this name", "rename one of them or uninstall the distribution")
    _validate(obj, info.describe())
    if not obj.__dict__.get("name"):
        obj.name = name
    return obj


def _import(info: PluginInfo) -> Any:
    module, _, attr = info.value.partition(":")
    try:
        obj: Any = importlib.import_module(module.strip())
        for part in attr.strip().split("."):
            obj = getattr(obj, part)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any plugin failure must stay contained
        d = info.distribution
        fix = (f"reinstall it (pip install --force-reinstall {d}) or fix the plugin's code; `pip uninstall {d}` "
               f"removes it; other plugins are unaffected" if info.origin == "entry point"
               else "check the module path and class name, and that the module is importable")
        raise PluginError(info.describe(), f"loading it failed: {type(e).__name__}: {e}", fix) from e
    return obj


# ------------------------------------------------------------------ options
def options_of(cls: type[ZOOptimizer]) -> dict[str, Option]:
    """The options of a plugin class, in signature order, ``seed`` excluded.

    Raises:
        PluginError: a bad ``__init__`` signature (see the module docstring).
    """
    opts: dict[str, Option] = {}
    for name, param, ann, owner in _params(cls, f"{cls.__module__}.{cls.__qualname__}"):
        if name in RESERVED:
            continue
        opts[name] = Option(name, ann, param.default, _doc_args(owner).get(name, ""))
    return opts


def description_of(cls: type) -> str:
    """The class's ``description`` attribute, else its docstring's first line."""
    return getattr(cls, "description", "") or _first_line(cls.__doc__)


def parse_opts(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` (repeated ``--opt``) to ``{"k": "v"}``; values stay strings for :func:`build`.

    Raises:
        PluginError: an item without ``=``, an empty key, or a key given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PluginError(f"--opt {item!r}", "is not KEY=VALUE",
                              "write each option as --opt KEY=VALUE, e.g. --opt eps=1e-3 (the optimizer itself "
                              "is --optimizer NAME)")
        if key in out:
            raise PluginError(f"--opt {key}", f"is given twice ({out[key]!r} and {value!r})", "give it once")
        out[key] = value
    return out


def build(name: str, options: Mapping[str, Any], *, seed: int) -> ZOOptimizer:
    """Load plugin ``name`` and instantiate it with ``options`` (coerced) and ``seed``.

    Args:
        name: registry name or ``"module:Class"``.
        options: option values; strings are coerced by annotation, typed values are checked.
            ``-`` in a key is read as ``_`` when the key itself is unknown.
        seed: the run's seed.

    Raises:
        PluginError: see :func:`load`; an unknown key (with valid options and close matches), ``seed``
            among the options, a value that does not fit the option's type, or the constructor failing.
    """
    cls = load(name)
    opts = options_of(cls)
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        okey = key if key in opts else str(key).replace("-", "_")
        if okey in RESERVED:
            raise PluginError(f"option '{key}' of optimizer '{name}'", "is set by the trainer, not by --opt",
                              "use the trainer's --seed option instead")
        if okey not in opts:
            close = difflib.get_close_matches(okey, list(opts), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise PluginError(f"option '{key}' of optimizer '{name}'",
                              f"is not an option of this plugin; its options are: {', '.join(opts) or '(none)'}",
                              f"{hint}see `zoedge plugins {name}`")
        opt = opts[okey]
        try:
            kwargs[okey] = coerce(value, opt.annotation)
        except ValueError as e:
            why = f" ({e})" if str(e) else ""
            raise PluginError(f"option '{key}' of optimizer '{name}'",
                              f"{value!r} is not a valid value of type {opt.type_name}{why}",
                              f"give a {opt.type_name}, e.g. --opt {okey}={cli_text(opt.default)} (the default)") from e
    try:
        return cls(seed=seed, **kwargs)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin rejected its options: report, don't trace
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "defaults"
        raise PluginError(f"optimizer plugin '{name}'",
                          f"constructing it with {shown} failed: {type(e).__name__}: {e}",
                          "change the options named in the message") from e


def cli_text(value: Any) -> str:
    """``value`` as ``--opt KEY=TEXT`` text that :func:`coerce` reads back (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def coerce(value: Any, annotation: Any) -> Any:
    """Convert ``value`` to ``annotation``: strings are parsed, typed values checked (int → float allowed).

    Supported: ``int``, ``float``, ``bool`` (true/false/1/0/yes/no/on/off), ``str``, ``Literal[...]``,
    unions such as ``X | None`` (``none``/``null`` → ``None``), ``list[X]``/``tuple[X, ...]`` (comma
    separated), other classes constructible from a string (e.g. ``Path``); ``None``/``Any`` pass through.

    Raises:
        ValueError: the value does not fit (message says why, may be empty).
    """
    ann = annotation
    if ann is None or ann is Any:
        return value
    origin = typing.get_origin(ann)
    if origin is Literal:
        for choice in typing.get_args(ann):
            if (type(value) is type(choice) and value == choice) or (
                    isinstance(value, str) and value.strip() == str(choice)):
                return choice
        raise ValueError(f"choose one of {', '.join(str(c) for c in typing.get_args(ann))}")
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(ann)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower()
                                                     in ("none", "null"))):
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg)
                except ValueError:
                    continue
        raise ValueError("")
    if origin in (list, tuple, Sequence, typing.Sequence):
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError("expected a comma-separated list")
        args = [a for a in typing.get_args(ann) if a is not Ellipsis] or [Any]
        if origin is tuple and Ellipsis not in typing.get_args(ann) and len(args) != len(items):
            raise ValueError(f"expected {len(args)} comma-separated values")
        per = args if len(args) == len(items) and origin is tuple else [args[0]] * len(items)
        out = [coerce(v, a) for v, a in zip(items, per)]
        return out if origin is list else tuple(out)
    if ann is bool:
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("use true/false, yes/no or 1/0")
    if isinstance(value, bool) and ann in (int, float):
        raise ValueError("a boolean is not a number")
    if ann is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                f = float(value)  # "1e3" is fine, "1.5" is not
            except ValueError:
                raise ValueError("") from None
            if f.is_integer():
                return int(f)
        raise ValueError("")
    if ann is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError("") from None
        raise ValueError("")
    if origin is None and isinstance(ann, type):
        if isinstance(value, ann):
            return value
        if isinstance(value, str):  # str, Path, other classes built from text
            try:
                return ann(value)
            except Exception as e:  # noqa: BLE001
                raise ValueError(str(e)) from e
        raise ValueError("")
    return value  # typing constructs we do not model: passed through unchanged


# ------------------------------------------------------------------ validation helpers
def _validate(cls: Any, label: str) -> None:
    """Raise PluginError unless ``cls`` is a complete ZOOptimizer subclass with a valid signature."""
    if not (isinstance(cls, type) and issubclass(cls, ZOOptimizer)):
        raise PluginError(label, f"is {cls!r}, not a subclass of zoedge.optim.api.ZOOptimizer",
                          "point the plugin at a class deriving from ZOOptimizer")
    missing = []
    for hook in cls.REQUIRED_HOOKS:
        owner = next((k for k in cls.__mro__ if hook in k.__dict__), None)
        if owner is None or owner is ZOOptimizer or not issubclass(owner, ZOOptimizer) or getattr(
                getattr(cls, hook, None), "__isabstractmethod__", False):
            missing.append(hook)
    if missing:
        raise PluginError(label, f"does not override the required hook(s) {', '.join(missing)}",
                          f"implement {', '.join(missing)} (see zoedge/optim/base.py for the contract)")
    owned = [m for m in cls.FRAMEWORK_METHODS
             if next(k for k in cls.__mro__ if m in k.__dict__) is not ZOOptimizer]
    if owned:
        raise PluginError(label, f"overrides the framework method(s) {', '.join(owned)}",
                          "implement draw / perturb / end_step / apply instead: the framework owns the lazy "
                          "update (see zoedge/optim/base.py)")
    params = _params(cls, label)
    names = {p[0] for p in params}
    if "seed" not in names:
        raise PluginError(label, "__init__ accepts no 'seed' (the trainer passes seed=...)",
                          "add a keyword parameter seed: int = 0 and pass it to super().__init__")
    no_default = [n for n, p, _, _ in params if p.default is inspect.Parameter.empty and n not in RESERVED]
    if no_default:
        raise PluginError(label, f"option(s) {', '.join(no_default)} have no default",
                          "give every keyword __init__ parameter a default value")


def _params(cls: type, label: str) -> list[tuple[str, inspect.Parameter, Any, type]]:
    """(name, parameter, resolved annotation, owning class) of the options, following ``**kwargs`` up the MRO."""
    out: dict[str, tuple[str, inspect.Parameter, Any, type]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError) as e:
            raise PluginError(label, f"__init__ signature of {klass.__qualname__} cannot be read: {e}",
                              "define __init__(self, *, option=default, ...) in Python") from e
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
            hints = {}
        follow = False
        for i, p in enumerate(sig.parameters.values()):
            if i == 0:
                continue  # self
            if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                raise PluginError(label, f"{klass.__qualname__}.__init__ takes {p} (positional)",
                                  "options must be keyword parameters: def __init__(self, *, name=default, ...)")
            if p.kind is p.VAR_KEYWORD:
                follow = True
                continue
            ann = hints.get(p.name, p.annotation)
            if ann is inspect.Parameter.empty or isinstance(ann, str):
                ann = type(p.default) if p.default not in (None, inspect.Parameter.empty) else None
            out.setdefault(p.name, (p.name, p, ann, klass))
        if klass is ZOOptimizer or not follow:
            break
    return list(out.values())


def _doc_args(owner: type) -> dict[str, str]:
    """The Args sections of ``owner``'s ``__init__`` and class docstrings: {name: help, joined to one line}."""
    out: dict[str, str] = {}
    for doc in (owner.__dict__["__init__"].__doc__, owner.__doc__):
        found: dict[str, list[str]] = {}
        current, indent, in_args = None, None, False
        for line in inspect.cleandoc(doc or "").splitlines():
            stripped, ind = line.strip(), len(line) - len(line.lstrip())
            if stripped in ("Args:", "Arguments:", "Parameters:"):
                current, indent, in_args = None, None, True
                continue
            if not in_args or not stripped:
                continue
            indent = ind if indent is None else indent
            m = re.match(r"^(\w+)\s*(?:\([^)]*\))?:\s*(.*)$", stripped)
            if ind < indent:
                in_args = False
            elif ind == indent and m:
                current = m.group(1)
                found[current] = [m.group(2)]
            elif current is not None and ind > indent:
                found[current].append(stripped)
        for name, parts in found.items():
            out.setdefault(name, " ".join(p for p in parts if p))
    return out


def _first_line(doc: str | None) -> str:
    return inspect.cleandoc(doc).splitlines()[0].strip() if doc and doc.strip() else ""


def _qualified(cls: type, sep: str = ":") -> str:
    return f"{cls.__module__}{sep}{cls.__qualname__}"


def _type_name(ann: Any) -> str:
    if ann is None:
        return "any"
    if typing.get_origin(ann) is Literal:
        return "|".join(str(c) for c in typing.get_args(ann))
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return ann.__name__
    return str(ann).replace("typing.", "").replace("NoneType", "None")
