"""Shell commands for MoE-R: `moe route`, `moe query`, `moe experts`, `settings moe`.

The render_* functions are pure (dict in, text out) so tests can check the formats with plain
dicts; the commands only call the daemon and print.
"""

from __future__ import annotations

from typing import Any, Mapping

from hublabio.params import MOE, SYNTHESES
from hublabio.shell import render
from hublabio.shell.commands import ShellContext, UsageError, command

MOE_KEYS = tuple(p.name for p in MOE)  # routing takes the strategy's parameter too

SETTINGS_USAGE = ("settings moe [routing topk <k> | routing threshold <t> | routing single | "
                  f"routing all | synthesis <{'|'.join(SYNTHESES)}> | "
                  "confidence_weight <0..1> | enabled <on|off>]")


def render_route(data: Mapping[str, Any]) -> str:
    """`moe route`: the query, one `→ Expert` line per candidate (best first), the selection."""
    scores = data.get("scores") or {}
    lines = [f'Query: "{data.get("query", "")}"']
    for domain, p in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  → Expert: {domain} (confidence: {p:.2f})")
    selected = ", ".join(r["domain"] for r in data.get("selected") or [])
    note = " (no expert passed; general answers)" if data.get("fallback") else ""
    lines.append(f"  Selected: {selected}{note}")
    if data.get("router_warning"):
        lines.append(f"  ({data['router_warning']})")
    return "\n".join(lines)


def render_experts(data: Mapping[str, Any]) -> str:
    """`moe experts`: one row per expert; memory is its resident model's (shared bases share)."""
    rows = []
    for e in data.get("experts") or []:
        if e.get("missing"):
            state = "missing"
        elif e.get("type") == "remote":
            state = "remote"
        else:
            state = "loaded" if e.get("loaded") else "-"
        adapter = e.get("adapter")
        adapter = adapter.rsplit("/", 1)[-1] if adapter else "-"
        shared = ", ".join(e.get("shared_base_with") or []) or "-"
        rows.append([e.get("domain"), e.get("model"), state,
                     render.human_mb(e.get("memory_mb")) if e.get("memory_mb") is not None else "-",
                     adapter, shared])
    if not rows:
        return "No experts configured (models/experts/*.toml)."
    lines = [render.table(["DOMAIN", "MODEL", "LOADED", "MEMORY", "ADAPTER", "SHARES BASE WITH"],
                          rows, "lllrll")]
    lines.append(f"Router: {data.get('router', '?')}"
                 + (f" ({data['router_warning']})" if data.get("router_warning") else ""))
    if data.get("budget_mb") is not None:
        lines.append(f"Memory: {render.human_mb(data.get('used_mb'))} used of "
                     f"{render.human_mb(data.get('budget_mb'))}")
    for e in data.get("experts") or []:
        if e.get("missing"):
            lines.append(f"  {e['domain']}: {e['missing']}")
    return "\n".join(lines)


def render_settings(data: Mapping[str, Any]) -> str:
    """`settings moe`, in the seed's words: routing and synthesis strategy, the router, and the
    active experts with their size (the adapter's, for experts that share a base)."""
    lines = [f"MoE-R: {'enabled' if data.get('enabled') else 'disabled'}",
             f"Routing Strategy: {strategy_title(data.get('routing') or '')}",
             f"Synthesis Strategy: {str(data.get('synthesis') or '').capitalize()}"
             + _weight_note(data.get("settings") or {}),
             f"Router: {data.get('router')}"
             + (f" ({data['router_warning']})" if data.get("router_warning") else ""),
             "Active Experts:" + ("" if data.get("active_experts") else " none")]
    sizes = data.get("expert_sizes") or {}
    for domain in data.get("active_experts") or []:
        size = sizes.get(domain) or {}
        what = (f"{render.human_mb(size['mb'])} {size['kind']}" if size.get("mb") is not None
                else size.get("kind", ""))
        lines.append(f"  - {domain}" + (f" ({size.get('model')}, {what})" if size else ""))
    for domain, why in (data.get("unavailable_experts") or {}).items():
        lines.append(f"  unavailable: {domain}: {why}")
    return "\n".join(lines)


def _weight_note(settings: Mapping[str, Any]) -> str:
    weight = settings.get("confidence_weight")
    return "" if weight is None else f" (router + {weight:g} x answer log-prob)"


def strategy_title(routing: str) -> str:
    """"topk 2" -> "TopK (2)", "threshold 0.4" -> "Threshold (0.4)", "single" -> "Single"."""
    name, _, param = routing.partition(" ")
    title = {"topk": "TopK"}.get(name, name.capitalize())
    return f"{title} ({param})" if param else title


def render_settings_set(data: Mapping[str, Any]) -> str:
    key = data.get("key")
    if key == "routing":
        shown = data.get("routing")
    elif key == "enabled":
        shown = "on" if data.get("enabled") else "off"
    else:
        shown = (data.get("settings") or {}).get(key, data.get("value"))
    return f"MoE {key}: {shown} (saved)"


@command("moe route", usage='moe route "<question>"')
def moe_route(ctx: ShellContext, args: list[str]) -> None:
    """Show how the router scores a question for each expert and which experts it selects.

    Example: moe route "why does cargo build fail with E0382?" """
    if not args:
        raise UsageError('usage: moe route "<question>"')
    ctx.out.line(render_route(ctx.client.call("moe.route", query=" ".join(args))))


@command("moe query", usage='moe query "<question>"')
def moe_query(ctx: ShellContext, args: list[str]) -> None:
    """Ask the experts: the router picks them, they answer, the synthesizer combines.

    Prints [Router], [Expert] and [Synthesizer] lines, then the answer (Ctrl-C cancels)."""
    if not args:
        raise UsageError('usage: moe query "<question>"')
    ctx.stream("moe.query", query=" ".join(args))


@command("moe experts")
def moe_experts(ctx: ShellContext, args: list[str]) -> None:
    """List the experts: model, loaded or not, memory, LoRA adapter, shared base."""
    if args:
        raise UsageError("usage: moe experts")
    ctx.out.line(render_experts(ctx.client.call("moe.experts")))


@command("settings moe", usage=SETTINGS_USAGE,
         complete=list(MOE_KEYS))
def settings_moe(ctx: ShellContext, args: list[str]) -> None:
    """Show or change MoE-R settings; changes are saved (crash-safe) and survive a restart.

    settings moe                      show routing, synthesis and the active experts
    settings moe routing topk 2       the 2 most probable experts answer
    settings moe routing threshold 0.4  every expert scoring >= 0.4 answers
    settings moe routing single|all
    settings moe synthesis voting     best | weighted | voting | concatenate | summarize
    settings moe confidence_weight 0.5  how much an answer's own confidence counts against
                                      the router (0: the router alone; docs/MOE.md)
    settings moe enabled off          ?question goes to the plain model"""
    if not args:
        ctx.out.line(render_settings(ctx.client.call("settings.moe.get")))
        return
    key, rest = args[0], args[1:]
    if key == "routing":
        if not rest or len(rest) > 2:
            raise UsageError(f"usage: {SETTINGS_USAGE}")
        value = " ".join(rest)
    elif key in MOE_KEYS:
        if len(rest) != 1:
            raise UsageError(f"usage: {SETTINGS_USAGE}")
        value = rest[0]
    else:
        raise UsageError(f"unknown MoE setting {key!r}; usage: {SETTINGS_USAGE}")
    data = ctx.client.call("settings.moe.set", key=key, value=value)
    ctx.out.line(render_settings_set(data))
