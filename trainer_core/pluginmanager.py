"""A fresh pluggy manager per run, and the checks that make a plugin's
mistakes fail before training starts with a message naming the plugin."""

from __future__ import annotations

import inspect
import logging
from types import TracebackType
from typing import Any, Callable, Mapping

import pluggy

from trainer_core import hookspecs
from trainer_core.entrypoints import Entry
from trainer_core.errors import PluginError, TrainerError, UsageError
from trainer_core.options import bind_options
from trainer_core.suggest import did_you_mean

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
log = logging.getLogger("trainer_core")


def make_plugin_manager() -> pluggy.PluginManager:
    """Return a new manager that knows the hook specs and holds no plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def hook_names() -> list[str]:
    """Every hook in the contract, in the order :mod:`trainer_core.hookspecs` declares them."""
    return [name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "trainer_spec")]


def implemented_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hook names ``plugin`` implements (by attribute, following ``specname``)."""
    found = []
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None:
            found.append(opts.get("specname") or attr)
    return sorted(found)


def unused_hooks(plugin: object, *names: str) -> None:
    """Leave the hooks ``names`` out when ``plugin`` is registered.

    Call it from ``__init__`` for a per-step hook the plugin's options make
    idle (a histogram hook with histograms off): an unregistered hook costs
    nothing per step, a registered one costs a call even when it returns at once.
    """
    for name in names:
        setattr(plugin, name, None)


def check_plugin(pm: pluggy.PluginManager, name: str, plugin: object, origin: str) -> None:
    """Raise :class:`PluginError` if a hook implementation of ``plugin`` has a
    name that is not in the contract or takes an argument its spec does not offer."""
    known = hook_names()
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        if hook not in known:
            raise PluginError(f"plugin '{name}' ({origin}) implements unknown hook '{hook}'{did_you_mean(hook, known)}")
        offered = getattr(pm.hook, hook).spec.argnames
        params = list(inspect.signature(getattr(plugin, attr)).parameters)
        if inspect.isclass(plugin):  # listed before instantiation: skip ``self``
            params = params[1:]
        wanted = [p for p in params if p not in offered]
        if wanted:
            raise PluginError(
                f"plugin '{name}' ({origin}): hook {hook}() asks for {', '.join(wanted)}, "
                f"which the spec does not pass; {hook} offers: {', '.join(offered)}"
            )


def register(pm: pluggy.PluginManager, name: str, plugin: object, origin: str = "registered in code") -> None:
    """Check ``plugin`` against the specs and register it under ``name``."""
    if pm.has_plugin(name):
        raise UsageError(f"plugin '{name}' is enabled twice")
    check_plugin(pm, name, plugin, origin)
    pm.register(plugin, name=name)


def instantiate(entry: Entry, options: Mapping[str, Any]) -> object:
    """Load ``entry`` and build the plugin: a class is called with its coerced
    options; a module or object is used as it is and takes no options."""
    target = entry.load()
    if not inspect.isclass(target):
        if options:
            raise UsageError(f"plugin '{entry.name}' takes no options (got {', '.join(options)})")
        return target
    kwargs = bind_options(target, options, owner=entry.name)
    try:
        return target(**kwargs)
    except ValueError as exc:  # a plugin's own validation of its options
        raise UsageError(f"{entry.name}: {exc}") from None


def call_each(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> dict[str, Any]:
    """Call every implementation of ``hook`` and return results keyed by the
    registered plugin name (pluggy's own call merges them anonymously)."""
    results = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        results[impl.plugin_name] = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
    return results


def call_each_guarded(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call every implementation of ``hook``; one that raises is reported as a
    warning and the others still run (``on_exception`` must not hide the
    exception that ended the run)."""
    for impl in getattr(pm.hook, hook).get_hookimpls():
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as exc:
            log.warning("plugin '%s' failed in %s: %s: %s", impl.plugin_name, hook, type(exc).__name__, exc)


def merge_collected(pm: pluggy.PluginManager, metrics: dict[str, float], producers: dict[str, str], **kwargs: Any) -> None:
    """Add every plugin's ``collect_eval_metrics`` result to ``metrics``, whose
    keys ``producers`` names the producer of; a name produced twice is an error naming both."""
    for plugin, extra in call_each(pm, "collect_eval_metrics", **kwargs).items():
        for key, value in (extra or {}).items():
            if key in producers:
                raise PluginError(f"metric '{key}' is produced by both {producers[key]} and plugin '{plugin}'; rename one")
            producers[key] = f"plugin '{plugin}'"
            metrics[key] = float(value)


def direct_caller(pm: pluggy.PluginManager, hook: str) -> Callable[..., None] | None:
    """A caller for a per-step ``hook`` that costs as little as a plain call.

    ``None`` when no plugin implements it (an unused hook costs one truth test).
    Otherwise a function taking the hook's keyword arguments that calls each
    implementation in pluggy's order (``tryfirst``/``trylast``, then the last
    registered first), passing only the arguments each asks for, and discards
    the results.  pluggy's own call costs ~2 us more per step, which a 0.3 ms
    training step notices.  A wrapper, or an argument with a default, needs
    pluggy's machinery: then the hook's pluggy caller is returned as it is.
    """
    caller = getattr(pm.hook, hook)
    impls = caller.get_hookimpls()
    if not impls:
        return None
    if any(impl.hookwrapper or impl.wrapper or impl.kwargnames for impl in impls):
        return caller
    calls = [(impl.function, impl.argnames) for impl in reversed(impls)]

    def call(**kwargs: Any) -> None:
        for function, argnames in calls:
            function(*[kwargs[name] for name in argnames])

    return call


def blame_plugin(pm: pluggy.PluginManager, exc: BaseException) -> PluginError | None:
    """The error naming the plugin and hook whose code raised ``exc``, or ``None``
    when no plugin is to blame (the core's own errors, a Ctrl-C that lands in
    whatever code runs, a plugin's included, or the reader of our output gone:
    ``trainer run | head`` stops as Unix tools do, whoever printed)."""
    if not isinstance(exc, Exception) or isinstance(exc, (TrainerError, BrokenPipeError)):
        return None
    fault = locate_fault(pm, exc.__traceback__)
    return PluginError(f"plugin '{fault[0]}' failed in {fault[1]}: {type(exc).__name__}: {exc}") if fault else None


def locate_fault(pm: pluggy.PluginManager, tb: TracebackType | None) -> tuple[str, str] | None:
    """The (plugin name, hook name) whose implementation appears first in
    ``tb``, or ``None`` when no plugin code raised."""
    owners = {}
    for hook in hook_names():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            code = getattr(inspect.unwrap(impl.function), "__code__", None)
            if code is not None:
                owners[code] = (impl.plugin_name, hook)
    while tb is not None:
        if tb.tb_frame.f_code in owners:
            return owners[tb.tb_frame.f_code]
        tb = tb.tb_next
    return None
