"""sendtrail's report API (SPEC sections 1, 5 and 8): routes, queries, exports, pictures.

``add_routes(app, deps)`` registers the routes on an aiohttp application;
``ApiDeps`` carries the ClickHouse access; ``make_deps_for_client`` builds it
on a clickhouse-connect client.
"""
from sendtrail.api.errors import ApiError, BadRequest, NotFound
from sendtrail.api.routes import ROUTES, ApiDeps, add_routes, make_deps_for_client

__all__ = ["ApiDeps", "ApiError", "BadRequest", "NotFound", "ROUTES", "add_routes", "make_deps_for_client"]
