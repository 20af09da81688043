"""Dependencies shared by the routers: the engine, bearer-token checks for admin and client endpoints, and whether a
request is the admin's (who sees server paths)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vislora.errors import Forbidden, Unauthorized
from vislora.serve.engine import Engine

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@dataclass(frozen=True)
class Tokens:
    """The tokens the server was started with; None = not set."""

    admin: str | None
    client: str | None


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def _check(credentials: HTTPAuthorizationCredentials | None, token: str, what: str) -> None:
    if credentials is None:
        raise Unauthorized(f"this endpoint needs the {what} token: send the header 'Authorization: Bearer <token>'")
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise Unauthorized(f"the bearer token is not the {what} token")


def require_admin(request: Request, credentials: Credentials) -> None:
    """Admin endpoints (load/unload adapters, change rollouts): refused unless an admin token was configured."""
    tokens: Tokens = request.app.state.tokens
    if tokens.admin is None:
        raise Forbidden("admin endpoints are disabled: start the server with an admin token (environment variable "
                        "VISLORA_ADMIN_TOKEN, or auth.admin_token in the config)")
    _check(credentials, tokens.admin, "admin")


def require_client(request: Request, credentials: Credentials) -> None:
    """Predict/embed/read endpoints: open unless a client token was configured (the admin token also passes)."""
    tokens: Tokens = request.app.state.tokens
    if tokens.client is None:
        return
    if credentials is not None and tokens.admin is not None and secrets.compare_digest(
            credentials.credentials.encode(), tokens.admin.encode()):
        return
    _check(credentials, tokens.client, "client")


def is_admin(request: Request) -> bool:
    """Whether the request carries the admin token (it sees server paths and full error messages)."""
    admin: str | None = request.app.state.tokens.admin
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return admin is not None and scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(),
                                                                                       admin.encode())


def require_exposed(endpoint: Literal["stats", "metrics"]) -> Callable[[Request, Credentials], None]:
    """The token check of an endpoint whose audience the serve config's `expose` section sets (open, client,
    admin)."""
    def check(request: Request, credentials: Credentials) -> None:
        access = getattr(request.app.state.config.expose, endpoint)
        if access == "client":
            require_client(request, credentials)
        elif access == "admin":
            require_admin(request, credentials)
    return check


EngineDep = Annotated[Engine, Depends(get_engine)]
