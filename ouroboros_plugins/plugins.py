"""The plugin manager: entry-point discovery (once, lazily), backbone lookup and the host-adapter check.

Each entry point of the group ``ouroboros_plugins`` is loaded on its own: a plugin that fails to import, that
pluggy rejects, or whose hook raises when called is recorded as a `PluginProblem` and skipped, so one broken
third-party distribution never takes the ``ouroboros`` command or the other plugins down with it.
``ouroboros plugins`` lists the problems; every other command prints one warning line per problem.

Nothing here imports a host framework: whether a host (peft, vLLM, lm-eval, transformers) is importable, and in
which version, is read from ``importlib.util.find_spec`` and the installed package metadata.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import pluggy

from . import hookspecs
from .hookspecs import HostAdapter

if TYPE_CHECKING:
    from .backbones.base import Backbone

_manager: Optional[OuroborosPluginManager] = None
BUILTIN_MODULES = ("ouroboros_plugins.backbones.llama", "ouroboros_plugins.backbones.qwen2")
CORE_DISTRIBUTION = "ouroboros-plugins"


# --------------------------------------------------------------------------------------------------------------
# Problems and the plugin manager


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that could not be loaded, or one of whose hooks failed.

    ``stage`` is ``"load"`` (importing the entry point raised), ``"register"`` (pluggy or the core rejected the
    plugin: a hook implementation that does not match its hookspec, an unknown hook, a name already taken) or the
    name of the hook that raised or returned something of the wrong type. After ``load`` and ``register`` the
    plugin is not registered at all; after a hook failure it stays registered and only that call's result is
    dropped.
    """

    name: str
    distribution: str
    version: str
    stage: str
    error: str

    @property
    def loaded(self) -> bool:
        return self.stage not in ("load", "register")

    def describe(self) -> str:
        origin = f"{self.distribution} {self.version}".strip()
        what = {"load": "failed to load", "register": "was rejected"}.get(self.stage, f"hook {self.stage} failed")
        return f"plugin {self.name!r} ({origin or 'no distribution'}) {what}: {self.error}"

    def as_dict(self) -> dict:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "stage": self.stage, "loaded": self.loaded, "error": self.error}


def _summary(exc: BaseException) -> str:
    """`Type: message` on one line (pluggy's validation messages span several), at most 300 characters."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class _DistInfo:
    """What `list_plugin_distinfo` hands out (like pluggy's own facade): the distribution, plus `project_name`."""

    def __init__(self, dist: md.Distribution):
        self._dist = dist

    @property
    def project_name(self) -> str:
        return self._dist.metadata["name"]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dist, attr)


class OuroborosPluginManager(pluggy.PluginManager):
    """pluggy's manager with entry points loaded one at a time and every failure recorded in `problems`."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self._dists: dict[str, md.Distribution] = {}  # plugin name -> the distribution that declared it

    # -- discovery ---------------------------------------------------------------------------------------------
    def load_entry_points(self, group: str = hookspecs.PROJECT) -> int:
        """Register every plugin of entry-point `group`; returns how many were registered. Never raises for a
        plugin's fault: see `problems`."""
        count = 0
        seen: set[str] = set()
        for dist in md.distributions():
            project = _canonical(dist.metadata["name"] or "")
            if project in seen:  # the same distribution further down sys.path is shadowed, as its modules are
                continue
            seen.add(project)
            for ep in dist.entry_points:
                if ep.group != group or self.is_blocked(ep.name):
                    continue
                if self.has_plugin(ep.name):
                    owner = self._dists.get(ep.name)
                    taken_by = owner.metadata["name"] if owner is not None else "another plugin"
                    self._report(ep.name, dist, "register", f"plugin name {ep.name!r} is already taken by {taken_by}")
                    continue
                count += self._load(ep.name, ep.load, dist)
        return count

    def _load(self, name: str, load, dist: Optional[md.Distribution]) -> int:
        try:
            plugin = load()
        except (Exception, SystemExit) as exc:  # ImportError, SyntaxError, anything raised at import, sys.exit()
            self._report(name, dist, "load", _summary(exc))
            return 0
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # pluggy.PluginValidationError: a hookimpl that does not match its hookspec
            self._report(name, dist, "register", _summary(exc))
            return 0
        unknown = sorted(
            caller.name
            for caller in self.get_hookcallers(plugin) or []
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )
        if unknown:  # what pluggy's check_pending would refuse: a misspelt hook, or one this core does not have
            self.unregister(plugin)
            known = ", ".join(sorted(n for n in dir(self.hook) if n.startswith("ouroboros_")))
            self._report(name, dist, "register",
                         f"unknown hook(s) {', '.join(unknown)} (this ouroboros-plugins has: {known}; mark a hook "
                         "from a newer version with @hookimpl(optionalhook=True))")
            return 0
        if dist is not None:
            self._dists[name] = dist
        return 1

    def list_plugin_distinfo(self) -> list[tuple[object, _DistInfo]]:
        """(plugin, distribution) for every plugin registered from an entry point."""
        pairs = []
        for name, dist in self._dists.items():
            plugin = self.get_plugin(name)
            if plugin is not None:
                pairs.append((plugin, _DistInfo(dist)))
        return pairs

    # -- where a plugin comes from ----------------------------------------------------------------------------
    def origin(self, name: str) -> tuple[str, str]:
        """(distribution, version) of a registered plugin: its entry point's distribution, the core for the
        built-in fallback, ("", "") for a plugin registered in-process."""
        dist = self._dists.get(name)
        if dist is not None:
            return dist.metadata["name"], dist.version
        plugin = self.get_plugin(name)
        module = getattr(plugin, "__name__", None) or getattr(type(plugin), "__module__", "")
        if module.split(".")[0] == "ouroboros_plugins":
            return CORE_DISTRIBUTION, _version(CORE_DISTRIBUTION)
        return "", ""

    def _report(self, name: str, dist: Optional[md.Distribution], stage: str, error: str) -> None:
        if dist is not None:
            project, version = dist.metadata["name"] or "", dist.version or ""
        else:
            project, version = self.origin(name) if self.has_plugin(name) else ("", "")
        problem = PluginProblem(name, project, version, stage, error)
        if problem not in self.problems:
            self.problems.append(problem)

    # -- calling hooks one implementation at a time ------------------------------------------------------------
    def _impls(self, hook_name: str) -> list:
        """A hook's implementations in pluggy's call order (last registered first); wrappers are skipped, they
        contribute nothing on their own."""
        caller = getattr(self.hook, hook_name)
        return [impl for impl in reversed(caller.get_hookimpls()) if not (impl.hookwrapper or impl.wrapper)]

    def _call(self, impl, hook_name: str, kwargs: dict) -> tuple[bool, Any]:
        try:
            return True, impl.function(*[kwargs[arg] for arg in impl.argnames])
        except Exception as exc:
            self._report(impl.plugin_name, None, hook_name, _summary(exc))
            return False, None

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of `hook_name` like pluggy would, except that one raising is recorded in
        `problems` and skipped. Returns (plugin name, result) for each non-None result."""
        results = []
        for impl in self._impls(hook_name):
            ok, result = self._call(impl, hook_name, kwargs)
            if ok and result is not None:
                results.append((impl.plugin_name, result))
        return results


def get_plugin_manager() -> OuroborosPluginManager:
    global _manager
    if _manager is None:
        pm = OuroborosPluginManager()
        pm.load_entry_points(hookspecs.PROJECT)
        # Running from a source tree that was never installed has no entry points: fall back to importing
        # the built-ins by name so the core still works (an installed package always takes the entry-point path).
        reported = {p.name for p in pm.problems}
        for module in BUILTIN_MODULES:
            name = module.rsplit(".", 1)[-1]
            registered = any(getattr(p, "__name__", None) == module for p in pm.get_plugins())
            if not registered and not pm.has_plugin(name) and name not in reported:
                pm._load(name, lambda module=module: importlib_module(module), None)
        _manager = pm
    return _manager


def importlib_module(name: str):
    return importlib.import_module(name)


def plugin_problems() -> list[PluginProblem]:
    """Every plugin problem found so far (loading happens on first use of the plugin manager)."""
    return list(get_plugin_manager().problems)


# --------------------------------------------------------------------------------------------------------------
# Backbones


def _backbones_by_plugin() -> list[tuple[str, list]]:
    pm = get_plugin_manager()
    out = []
    for name, result in pm.call_each("ouroboros_backbones"):
        items = list(result) if isinstance(result, (list, tuple)) else None
        if items is None or not all(isinstance(getattr(b, "model_types", None), (list, tuple)) for b in items):
            pm._report(name, None, "ouroboros_backbones",
                       f"TypeError: returned {_short_repr(result)}, expected a list of backbones (objects with "
                       "`model_types`)")
            continue
        out.append((name, items))
    return out


def all_backbones() -> list[Backbone]:
    return [b for _, group in _backbones_by_plugin() for b in group]


def find_backbone(model_type: str) -> Backbone:
    """The backbone handling `model_type`, or a ValueError listing the installed backbone plugins (and any plugin
    that failed to load, in case it was the one meant to handle `model_type`)."""
    backbones = all_backbones()
    for backbone in backbones:
        if model_type in backbone.model_types:
            return backbone
    installed = sorted({t for b in backbones for t in b.model_types})
    broken = get_plugin_manager().problems
    also = f" Plugins that failed: {'; '.join(p.describe() for p in broken)}." if broken else ""
    raise ValueError(
        f"unsupported architecture {model_type!r}: no Ouroboros backbone plugin handles it. "
        f"Installed backbone plugins handle: {installed}. Add one by implementing the `ouroboros_backbones` hook "
        f"under the entry-point group '{hookspecs.PROJECT}'.{also}"
    )


# --------------------------------------------------------------------------------------------------------------
# Commands


def register_commands(subparsers: argparse._SubParsersAction) -> dict[str, list[str]]:
    """Let every plugin add its sub-commands (`ouroboros_register_commands`), one plugin at a time: one that
    raises is recorded in `problems` and whatever it had added is removed again. Returns plugin -> commands."""
    pm = get_plugin_manager()
    added: dict[str, list[str]] = {}
    for impl in pm._impls("ouroboros_register_commands"):
        before = dict(subparsers.choices)
        actions = getattr(subparsers, "_choices_actions", None)
        n_actions = len(actions) if actions is not None else 0
        ok, _ = pm._call(impl, "ouroboros_register_commands", {"subparsers": subparsers})
        new = [name for name in subparsers.choices if name not in before]
        if not ok:  # take back a half-registered command so the parser stays usable
            for name in new:
                del subparsers.choices[name]
            if actions is not None:
                del actions[n_actions:]
            continue
        if new:
            added.setdefault(impl.plugin_name, []).extend(new)
    return added


def _commands_by_plugin() -> dict[str, list[str]]:
    scratch = argparse.ArgumentParser(prog="ouroboros", add_help=False)
    return register_commands(scratch.add_subparsers())


# --------------------------------------------------------------------------------------------------------------
# Host adapters


@dataclass(frozen=True)
class HostCheck:
    """What `check_host` found out about one `HostAdapter`, without importing the host."""

    adapter: HostAdapter
    plugin: str  # the plugin that returned the record
    adapter_version: Optional[str]  # installed version of adapter.distribution
    supported: str  # the specifier ("" = any version)
    supported_from: str  # "metadata" (the adapter's installed requirements), "declared" (adapter.supported) or ""
    installed: Optional[str]  # the host's installed version, None if no distribution provides it
    installed_distribution: Optional[str]  # which distribution provides it (adapter.host or one of its aliases)
    importable: bool  # importlib.util.find_spec(adapter.module) finds it
    in_range: Optional[bool]  # installed satisfies supported; None when either is unknown

    @property
    def status(self) -> str:
        """``ok``, ``not installed``, ``not importable`` (metadata without the module), ``version out of range``
        or ``version unknown`` (the module is there but no distribution metadata names it)."""
        if not self.importable:
            return "not installed" if self.installed is None else "not importable"
        if self.installed is None:
            return "version unknown"
        return "version out of range" if self.in_range is False else "ok"

    def as_dict(self) -> dict:
        a = self.adapter
        return {
            "adapter": a.name, "plugin": self.plugin, "distribution": a.distribution,
            "adapter_version": self.adapter_version, "host": a.host, "module": a.module,
            "supported": self.supported, "supported_from": self.supported_from, "installed": self.installed,
            "installed_distribution": self.installed_distribution, "importable": self.importable,
            "in_range": self.in_range, "status": self.status, "provides": a.provides,
        }


def check_host(adapter: HostAdapter, plugin: str = "") -> HostCheck:
    """Supported range, installed version and importability of `adapter.host`, from metadata and
    `importlib.util.find_spec` only: nothing is imported."""
    supported, source = supported_range(adapter)
    installed, provider = None, None
    for dist_name in (adapter.host, *adapter.aliases):
        installed = _dist_version(dist_name)
        if installed is not None:
            provider = dist_name
            break
    in_range: Optional[bool] = None
    if installed is not None:
        in_range = _satisfies(installed, supported) if supported else True
    return HostCheck(adapter, plugin, _dist_version(adapter.distribution), supported, source, installed, provider,
                     _find_spec(adapter.module), in_range)


def supported_range(adapter: HostAdapter) -> tuple[str, str]:
    """(specifier, where it came from): the adapter distribution's installed requirement on the host (or an alias),
    else the record's declared `supported`."""
    names = {_canonical(n) for n in (adapter.host, *adapter.aliases)}
    try:
        requires = md.requires(adapter.distribution) or []
    except md.PackageNotFoundError:
        requires = []
    matches = [r for r in map(_parse_requirement, requires) if r is not None and r[0] in names]
    if matches:
        matches.sort(key=lambda r: bool(r[2]))  # an unconditional requirement before one behind a marker
        return _format_spec(matches[0][1]), "metadata"
    if adapter.supported:
        return _format_spec(adapter.supported), "declared"
    return "", ""


def host_adapters() -> list[HostCheck]:
    """Every `HostAdapter` the plugins declare (`ouroboros_host_adapters`), checked."""
    pm = get_plugin_manager()
    checks = []
    for name, result in pm.call_each("ouroboros_host_adapters"):
        items = list(result) if isinstance(result, (list, tuple)) else None
        if items is None or not all(isinstance(a, HostAdapter) for a in items):
            pm._report(name, None, "ouroboros_host_adapters",
                       f"TypeError: returned {_short_repr(result)}, expected a list of HostAdapter")
            continue
        checks.extend(check_host(a, plugin=name) for a in items)
    return sorted(checks, key=lambda c: (c.adapter.name, c.adapter.host))


def _find_spec(module: str) -> bool:
    """Whether `module` (top level) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules with __spec__ None
        return False


def _dist_version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _version(dist: str) -> str:
    return _dist_version(dist) or "unknown"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- version specifiers: `packaging` when it is installed (it nearly always is), else a small fallback ----------

_CLAUSE = re.compile(r"^(===|~=|==|!=|<=|>=|<|>)\s*(\S+)$")
_OPERATOR_ORDER = {">=": 0, ">": 0, "~=": 1, "==": 2, "===": 2, "!=": 3, "<=": 4, "<": 4}


def _format_spec(spec: str) -> str:
    """`<0.22,>=0.21.2` -> `>=0.21.2,<0.22`: lower bounds first, no spaces."""
    clauses = [c.replace(" ", "") for c in spec.split(",") if c.strip()]

    def order(clause: str) -> int:
        m = _CLAUSE.match(clause)
        return _OPERATOR_ORDER.get(m.group(1), 5) if m else 5

    return ",".join(sorted(clauses, key=order))


def _parse_requirement(text: str) -> Optional[tuple[str, str, str]]:
    """(canonical name, specifier, marker) of a PEP 508 requirement string; None if it cannot be parsed."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return _parse_requirement_fallback(text)
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return None
    return _canonical(req.name), str(req.specifier), str(req.marker) if req.marker else ""


_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*(\(?[^;@()]*\)?|@[^;]*)\s*(?:;\s*(.*))?$"
)


def _parse_requirement_fallback(text: str) -> Optional[tuple[str, str, str]]:
    m = _REQUIREMENT.match(text)
    if not m:
        return None
    spec = m.group(2).strip()
    spec = "" if spec.startswith("@") else spec.strip("()").replace(" ", "")
    return _canonical(m.group(1)), spec, (m.group(3) or "").strip()


def _satisfies(version: str, spec: str) -> Optional[bool]:
    """Whether `version` satisfies `spec` (pre-releases included: this checks what is installed, not what to
    install); None if either cannot be parsed."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        return _satisfies_fallback(version, spec)
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except ValueError:  # InvalidSpecifier, InvalidVersion
        return None


_VERSION = re.compile(
    r"^v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|alpha|b|beta|c|rc|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?(?:post|rev|r)[-_.]?(?P<post>\d*)|-(?P<post2>\d+))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev>\d*))?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$",
    re.IGNORECASE,
)


def _version_key(version: str) -> Optional[tuple]:
    m = _VERSION.match(version.strip())
    if not m:
        return None
    release = [int(p) for p in m.group("release").split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    if m.group("pre"):
        rank = {"a": 0, "alpha": 0, "b": 1, "beta": 1}.get(m.group("pre").lower(), 2)
        phase = (1, rank, int(m.group("pre_n") or 0))
    elif m.group("post") is not None or m.group("post2"):
        phase = (3, int(m.group("post") or m.group("post2") or 0), 0)
    elif m.group("dev") is not None:
        phase = (0, 0, 0)  # 1.0.dev0 sorts before 1.0a1 and 1.0
    else:
        phase = (2, 0, 0)
    dev = (0, int(m.group("dev") or 0)) if m.group("dev") is not None else (1, 0)
    return int(m.group("epoch") or 0), tuple(release), phase, dev


def _is_pre(key: tuple) -> bool:
    return key[2][0] < 2 or key[3][0] == 0


def _is_post(key: tuple) -> bool:
    return key[2][0] == 3


def _release_prefix(key: tuple, target: str) -> bool:
    """`key` lies in the series `target` names (the `1.2` of `==1.2.*` or of `~=1.2.3`), epoch included."""
    epoch, _, release = target.rpartition("!")
    prefix = [int(p) for p in release.split(".") if p.isdigit()]
    padded = list(key[1]) + [0] * max(0, len(prefix) - len(key[1]))
    return key[0] == int(epoch or 0) and padded[: len(prefix)] == prefix


def _satisfies_fallback(version: str, spec: str) -> Optional[bool]:
    """A small PEP 440 comparison for interpreters without `packaging` (local labels ignored, as `packaging`
    does for specifiers without one)."""
    key = _version_key(version)
    if key is None:
        return None
    for clause in (c.replace(" ", "") for c in spec.split(",") if c.strip()):
        m = _CLAUSE.match(clause)
        if not m:
            return None
        op, target = m.groups()
        if op == "===":
            ok = version.strip() == target
        elif op in ("==", "!=") and target.endswith(".*"):
            match = _release_prefix(key, target[:-2])
            ok = match if op == "==" else not match
        else:
            other = _version_key(target)
            if other is None:
                return None
            if op == "~=":
                series = re.sub(r"[^0-9.!].*$", "", target.split("+")[0]).rsplit(".", 1)[0]
                ok = key >= other and _release_prefix(key, series)
            else:
                ok = {"==": key == other, "!=": key != other, "<=": key <= other, ">=": key >= other,
                      "<": key < other, ">": key > other}[op]
                same_release = key[:2] == other[:2]
                if op == "<" and same_release and _is_pre(key) and not _is_pre(other):
                    ok = False  # <1.0 does not admit 1.0rc1 (PEP 440 exclusive ordered comparison)
                if op == ">" and same_release and _is_post(key) and not (_is_post(other) or _is_pre(other)):
                    ok = False  # >1.0 does not admit 1.0.post1
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------------------------
# The listing


def describe_plugins() -> list[dict]:
    """One row per plugin, registered or broken: name, distribution and version, hooks implemented, whether it
    loaded, its problems, and what it contributes (backbones, commands, host adapters)."""
    pm = get_plugin_manager()
    backbones = {name: items for name, items in _backbones_by_plugin()}
    commands = _commands_by_plugin()
    hosts: dict[str, list[dict]] = {}
    for check in host_adapters():
        hosts.setdefault(check.plugin, []).append(check.as_dict())
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        project, version = pm.origin(name)
        rows.append({
            "name": name,
            "distribution": project,
            "version": version,
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
            "loaded": True,
            "backbones": [{"name": getattr(b, "name", type(b).__name__), "model_types": list(b.model_types)}
                          for b in backbones.get(name, [])],
            "commands": commands.get(name, []),
            "host_adapters": hosts.get(name, []),
        })
    registered = {row["name"] for row in rows}
    for problem in pm.problems:
        if problem.name not in registered:
            registered.add(problem.name)
            rows.append({"name": problem.name, "distribution": problem.distribution, "version": problem.version,
                         "hooks": [], "loaded": False, "backbones": [], "commands": [], "host_adapters": []})
    for row in rows:
        row["problems"] = [p.as_dict() for p in pm.problems if p.name == row["name"]]
        row["status"] = "broken" if row["problems"] else "ok"
    return sorted(rows, key=lambda r: r["name"])
