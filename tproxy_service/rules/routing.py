"""PURE: desired state -> policy-routing specs (fwmark rule + `local default dev lo` route)."""

from __future__ import annotations

from ..model import RouteSpec, RoutingState, RuleSpec, TproxySettings


def build_routing(settings: TproxySettings) -> RoutingState:
    families = (4, 6) if settings.ipv6 else (4,)
    return RoutingState(
        rules=tuple(RuleSpec(f, settings.mark, settings.route_table, settings.rule_priority) for f in families),
        routes=tuple(RouteSpec(f, settings.route_table) for f in families),
    )
